"""Fixtures of the PC/SC tests: this machine's pcscd (run by the test, as a host's) and a virtual
card in its first reader (tests/pcsc_rig.py). They need root (pcscd's /run/pcscd) and the Debian
packages `make deps` installs; without them they fail, saying what is missing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pcsc_rig import HostPcscd, VirtualCard, missing_tools


@pytest.fixture
def host_pcscd(tmp_path: Path) -> Iterator[HostPcscd]:
    missing = missing_tools()
    if missing:
        pytest.fail(f"PC/SC test tools missing: {', '.join(missing)}; run 'make deps'")
    if os.getuid() != 0:
        pytest.fail("the PC/SC tests run pcscd and need root")
    daemon = HostPcscd(tmp_path / "pcscd.log").start()
    yield daemon
    daemon.stop()


@pytest.fixture
def card(tmp_path: Path) -> Iterator[VirtualCard]:
    """A card emulator; not inserted until the test says so."""
    c = VirtualCard(tmp_path / "vicc")
    yield c
    if c.proc is not None and c.proc.poll() is None:
        c.proc.terminate()
        c.proc.wait(10)
