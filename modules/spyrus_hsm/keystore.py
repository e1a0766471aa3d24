"""The key store the orchestration code depends on: what renewal, registration, the hub
connection and the identity helpers ask of the token, and nothing more.

`hsm.Hsm` implements it (every call bounded by the pool's timeout, errors from `hsm.errors`);
tests drive the orchestration through every failure at every step with an in-memory one. A
key pair and the certificates stored beside it share a label; a generation of a renewed
credential is one label (see `cloud.renewal`).
"""

from __future__ import annotations

from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from .hsm import HsmState, KeyAlgorithm, KeyRef, ObjectInfo, SignAlgorithm


class KeyStore(Protocol):
    @property
    def state(self) -> HsmState:
        """Ready or not, and the token's label (the provider key references name it)."""

    def list_objects(self) -> list[ObjectInfo]:
        """Every object in the token."""

    def find(self, label: str, type: str | None = None) -> list[ObjectInfo]:
        """The objects labelled `label` (of `type`: private, public, cert, secret-key)."""

    def generate_keypair(self, label: str, algorithm: KeyAlgorithm) -> str:
        """A key pair made inside the token; its CKA_ID in hex."""

    def public_key(self, key: KeyRef) -> PublicKeyTypes:
        """The public half of the key pair `key`."""

    def key_algorithm(self, key: KeyRef) -> KeyAlgorithm:
        """What kind of key `key` is."""

    def sign(self, key: KeyRef, algorithm: SignAlgorithm, data: bytes) -> bytes:
        """A signature (or HMAC) over `data` made inside the token."""

    def derive_hmac_key(self, parent: KeyRef, message: bytes, label: str) -> str:
        """HMAC(parent, message) stored as the secret key `label` (DPS group enrollment)."""

    def certificate_chain(self, key: KeyRef) -> list[x509.Certificate]:
        """The certificates stored beside `key`, leaf first."""

    def import_certificates(self, label: str, certs: list[x509.Certificate]) -> str:
        """Store `certs` beside the key pair `label` (which must not have any yet)."""

    def replace_certificates(self, label: str, certs: list[x509.Certificate]) -> str:
        """Store `certs` beside the key pair `label` in place of those there: the new ones
        first, the old ones deleted after (interrupted: the old chain, or both; never none)."""

    def delete(self, ref: KeyRef) -> int:
        """Delete what `ref` names; the number of objects deleted."""
