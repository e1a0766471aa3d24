"""PKCS#11 operations, each run on a worker thread with that worker's own session.

Every function here takes a `WorkerSession` first; `hsm.client.Hsm` submits them to the pool.
They live by concern: `session` (the session, its handle cache, the token probe), `signing`,
`reads`, `writes` (with `templates`); this module gathers them for the facade.
"""

from __future__ import annotations

from .algorithms import MECHANISM_NAMES, P256_OID, P384_OID, KeyAlgorithm, SignAlgorithm
from .reads import (
    CATEGORY_AUTHORITY,
    CATEGORY_USER,
    certificate_chain,
    find_objects,
    has_certificates,
    key_id_of,
    list_objects,
    order_chain,
    public_key_spki,
    secret_key_value_readable,
)
from .session import ObjectInfo, ObjectKey, Template, WorkerSession, probe
from .signing import key_algorithm, sign, sign_unbound
from .writes import (
    delete,
    derive_hmac_key,
    generate_keypair,
    import_pkcs12_objects,
    import_private_key,
    import_secret_key,
    replace_certificates,
    store_certificates,
)

__all__ = [
    "CATEGORY_AUTHORITY", "CATEGORY_USER", "MECHANISM_NAMES", "P256_OID", "P384_OID",
    "KeyAlgorithm", "ObjectInfo", "ObjectKey", "SignAlgorithm", "Template", "WorkerSession",
    "certificate_chain", "delete", "derive_hmac_key", "find_objects", "generate_keypair",
    "has_certificates", "import_pkcs12_objects", "import_private_key", "import_secret_key",
    "key_algorithm", "key_id_of", "list_objects", "order_chain", "probe", "public_key_spki", "replace_certificates",
    "secret_key_value_readable", "sign", "sign_unbound", "store_certificates",
]
