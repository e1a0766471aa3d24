"""The audit log on a file system that fills up: every token handed out has a readable record.

A write that stops part-way through a line (ENOSPC after a short write) must not leave a torn
line to which the next record is appended: the service runs on a real 64 KiB tmpfs, under
concurrent load, until the file system is full.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from service_harness import ServiceHarness, new_leaf

from emulator.pki import EmulatorPki
from spyrus_hsm.hsm import Hsm
from spyrus_hsm.service.audit import AuditError, AuditLog

REQUESTS = 600
CONCURRENCY = 16


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _write(log: AuditLog, **fields: Any) -> None:
    """One record, as a fail-closed request writes it: awaited until its batch is on disk."""
    asyncio.run(log.submit(wait=True, timeout=10, **fields))


def _lines(path: Path) -> list[bytes]:
    return [line for line in path.read_bytes().split(b"\n") if line]


async def _load(svc: ServiceHarness, body: dict[str, Any], bearer: str) -> list[tuple[int, str, Any]]:
    connector = aiohttp.TCPConnector(ssl=svc.client_context(), limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one() -> tuple[int, str, Any]:
            async with gate, session.post(f"{svc.url}/v1/sas-tokens", json=body,
                                          headers={"Authorization": f"Bearer {bearer}"}) as response:
                return (response.status, response.headers.get("X-Request-Id", ""),
                        await response.json(content_type=None))
        return await asyncio.gather(*(one() for _ in range(REQUESTS)))


def test_every_token_handed_out_on_a_filling_disk_has_a_parseable_audit_record(
        hsm: Hsm, tmp_path: Path, tiny_fs: Path, emulator_pki: EmulatorPki) -> None:
    leaf = new_leaf(hsm)
    audit = tiny_fs / "audit.log"
    policy = [{"principals": ["*"], "operations": ["sas-token"], "devices": ["{cn}"]}]
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=policy, bearer={leaf.name: leaf.bearer},
                        audit_file=audit, rate_limit_per_second=0) as svc:
        results = asyncio.run(_load(svc, {"deviceId": leaf.name}, leaf.bearer))
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    assert statuses.count(503) > 0, "the file system never filled: the test proves nothing"
    assert statuses.count(200) > 0
    for status, _, body in results:
        if status == 503:
            assert body["type"].endswith("/audit-unavailable") and "token" not in body
    records = [json.loads(line) for line in _lines(audit)]  # a torn line fails here
    recorded = {r["requestId"] for r in records if r["status"] == 200 and r["outcome"] == "allowed"}
    handed_out = {request_id for status, request_id, _ in results if status == 200}
    assert handed_out <= recorded, f"{len(handed_out - recorded)} tokens were handed out without a record"


def test_a_record_after_a_torn_line_starts_on_a_new_line(tmp_path: Path) -> None:
    """A file left ending mid-record (a crash, or a cut-back that failed) gets no record glued on."""
    path = tmp_path / "audit.log"
    path.write_bytes(b'{"time":"2026-01-01T00:00:00.000Z","princ')
    log = AuditLog(str(path), fail_closed=True)
    _write(log, principal="p", operation="sas-token", outcome="allowed", reason="200", status=200)
    _write(log, principal="q", operation="sas-token", outcome="denied", reason="forbidden", status=403)
    log.close()
    lines = _lines(path)
    assert lines[0] == b'{"time":"2026-01-01T00:00:00.000Z","princ'
    assert [json.loads(line)["principal"] for line in lines[1:]] == ["p", "q"]


def test_a_full_file_system_fails_closed_and_leaves_no_partial_record(tiny_fs: Path) -> None:
    filler = tiny_fs / "filler"
    audit = tiny_fs / "audit.log"
    log = AuditLog(str(audit), fail_closed=True)
    reason = "x" * 700  # records larger than a short write's remainder
    written = 0
    with pytest.raises(AuditError, match="ENOSPC"):
        for _ in range(10_000):
            if written == 20:
                filler.write_bytes(b"\0" * 40_000)  # the disk fills up between two records
            _write(log, principal="p", operation="sas-token", outcome="allowed", reason=reason, status=200)
            written += 1
    lines = _lines(audit)
    assert len(lines) == written
    assert all(json.loads(line)["reason"] == reason for line in lines)
    assert audit.read_bytes().endswith(b"\n")
    filler.unlink()  # space again: the log carries on with whole records
    _write(log, principal="after", operation="sas-token", outcome="allowed", reason="200", status=200)
    log.close()
    assert json.loads(_lines(audit)[-1])["principal"] == "after"



def test_a_batch_that_does_not_fit_fails_every_record_in_it_and_leaves_none_of_them(tiny_fs: Path) -> None:
    """Group commit: whatever the batching, a waiter is told its record was written exactly when
    its line is in the file, and the file holds whole records only."""
    audit = tiny_fs / "audit.log"
    log = AuditLog(str(audit), fail_closed=True)
    (tiny_fs / "filler").write_bytes(b"\0" * (64 * 1024 - 6 * 1024))  # room for a few records, not all

    async def one(i: int) -> bool:
        try:
            await log.submit(wait=True, principal=f"p{i}", operation="sas-token", outcome="allowed",
                             reason="x" * 700, status=200)
        except AuditError:
            return False
        return True

    async def all_of_them() -> list[bool]:
        return await asyncio.gather(*(one(i) for i in range(40)))

    confirmed = asyncio.run(all_of_them())
    log.close()
    assert False in confirmed, "the file system never filled: the test proves nothing"
    written = [json.loads(line)["principal"] for line in _lines(audit)]  # a torn line fails here
    assert sorted(written) == sorted(f"p{i}" for i, ok in enumerate(confirmed) if ok)
    data = audit.read_bytes()
    assert data == b"" or data.endswith(b"\n")
