"""The audit log on a disk that stops taking writes: the loop keeps serving.

The stall is real: the audit "file" is a FIFO whose pipe buffer the test fills and whose reader
it holds back, so the log's `write` blocks in the kernel until the test drains the pipe. While it
does, answers that do not wait for their own record go out; a fail-closed signature waits (an
await, not a blocked loop) and is handed out once its record is written.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from service_harness import ServiceHarness, new_leaf, verify_sas

from emulator.pki import EmulatorPki
from spyrus_hsm.hsm import Hsm
from spyrus_hsm.service.audit import AuditLog

OWN_DEVICE = {"principals": ["*"], "operations": ["sas-token"], "devices": ["{cn}"]}


class StalledPipe:
    """A FIFO that takes no more bytes until `release`; then everything written to it is read."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = path
        self._reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        filler = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        try:
            for chunk in (b"\n" * 4096, b"\n"):  # blank lines: no records, and the buffer is full
                while True:
                    try:
                        os.write(filler, chunk)
                    except BlockingIOError:
                        break
        finally:
            os.close(filler)
        self._read: list[bytes] = []
        self._stop = threading.Event()
        self._drain: threading.Thread | None = None

    def release(self) -> None:
        self._drain = threading.Thread(target=self._read_until_stopped, daemon=True)
        self._drain.start()

    def _read_until_stopped(self) -> None:
        while not self._stop.is_set():
            if select.select([self._reader], [], [], 0.05)[0]:
                self._read.append(os.read(self._reader, 1 << 16))

    def records(self) -> list[dict[str, Any]]:
        """Everything written so far (call after the writer has flushed)."""
        self._stop.set()
        if self._drain is not None:
            self._drain.join()
        while True:
            try:
                data = os.read(self._reader, 1 << 16)
            except BlockingIOError:
                break
            if not data:
                break
            self._read.append(data)
        return [json.loads(line) for line in b"".join(self._read).split(b"\n") if line]

    def close(self) -> None:
        if self._drain is None:
            self.release()  # a failed test must not leave the service's writer stuck
        self._stop.set()
        if self._drain is not None:
            self._drain.join()
        os.close(self._reader)


@pytest.fixture
def stalled(tmp_path: Path) -> Iterator[StalledPipe]:
    pipe = StalledPipe(tmp_path / "audit.fifo")
    try:
        yield pipe
    finally:
        pipe.close()


def test_a_stalled_audit_disk_holds_only_the_fail_closed_signature_waiting_for_its_record(
        hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki, stalled: StalledPipe) -> None:
    leaf, other = new_leaf(hsm), new_leaf(hsm)
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=[OWN_DEVICE], bearer={leaf.name: leaf.bearer},
                        audit_file=stalled.path, rate_limit_per_second=0) as svc, ThreadPoolExecutor(1) as pool:
        denied_before = svc.call("POST", "/v1/sas-tokens", {"deviceId": other.name}, bearer=leaf.bearer,
                                 headers={"X-Request-Id": "denied-0"})
        token = pool.submit(svc.call, "POST", "/v1/sas-tokens", {"deviceId": leaf.name}, bearer=leaf.bearer,
                            headers={"X-Request-Id": "token"})
        # The writer is stuck: every answer that does not wait for its own record still goes out.
        denied = [svc.call("POST", "/v1/sas-tokens", {"deviceId": other.name}, bearer=leaf.bearer,
                           headers={"X-Request-Id": f"denied-{i}"}) for i in range(1, 20)]
        assert [d[0] for d in [denied_before, *denied]] == [403] * 20
        assert not token.done(), "a fail-closed token went out before its record was written"
        stalled.release()
        status, headers, body = token.result()
        assert status == 200, body
        verify_sas(body["token"], leaf.key)
        assert headers["x-request-id"] == "token"
        assert svc.service is not None and svc.service.audit.flush()
        records = {r["requestId"]: r for r in stalled.records()}
    assert records["token"]["status"] == 200 and records["token"]["outcome"] == "allowed"
    assert {f"denied-{i}" for i in range(20)} <= {k for k, r in records.items() if r["outcome"] == "denied"}


def test_without_fail_closed_tokens_go_out_while_the_audit_disk_is_stalled_and_are_recorded_after(
        hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki, stalled: StalledPipe) -> None:
    leaf = new_leaf(hsm)
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=[OWN_DEVICE], bearer={leaf.name: leaf.bearer},
                        audit_file=stalled.path, audit_fail_closed=False, rate_limit_per_second=0) as svc:
        answers = [svc.call("POST", "/v1/sas-tokens", {"deviceId": leaf.name}, bearer=leaf.bearer,
                            headers={"X-Request-Id": f"token-{i}"}) for i in range(10)]
        assert [a[0] for a in answers] == [200] * 10
        stalled.release()
        assert svc.service is not None and svc.service.audit.flush()
        recorded = {r["requestId"] for r in stalled.records() if r["status"] == 200}
    assert {f"token-{i}" for i in range(10)} <= recorded


def _submit(audit: AuditLog, count: int, *, wait: bool = False) -> None:
    async def run() -> None:
        for i in range(count):
            await audit.submit(wait=wait, principal=f"p{i}", operation="sas-token", outcome="denied",
                               reason="forbidden", status=403)
    asyncio.run(run())


def test_records_nobody_waits_for_are_dropped_and_counted_when_the_queue_is_full(
        stalled: StalledPipe, caplog: pytest.LogCaptureFixture) -> None:
    audit = AuditLog(str(stalled.path), fail_closed=True, queue_limit=5)
    _submit(audit, 1)  # the writer takes it and blocks in write: the queue is empty again
    assert not audit.flush(timeout=0.2), "the stall is not in effect: the test proves nothing"
    _submit(audit, 12)  # returns: the loop never waits for a full queue
    assert audit.dropped >= 7  # 5 queued at most (the first record may not have left the queue yet)
    assert "dropping new ones" in caplog.text
    stalled.release()
    assert audit.flush()
    audit.close()
    written = [r["principal"] for r in stalled.records()]
    assert len(written) + audit.dropped == 13
    assert written[1:] == [f"p{i}" for i in range(len(written) - 1)]  # the oldest kept, the newest dropped


def test_close_gives_up_on_a_stalled_disk_and_says_what_was_lost(
        stalled: StalledPipe, caplog: pytest.LogCaptureFixture) -> None:
    audit = AuditLog(str(stalled.path), fail_closed=False)
    _submit(audit, 3)
    audit.close(timeout=0.2)  # returns though the writer is still blocked
    assert "records are lost" in caplog.text


def test_with_fsync_every_batch_is_written_and_the_waiters_told(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    audit = AuditLog(str(path), fail_closed=True, fsync=True)
    _submit(audit, 3, wait=True)
    audit.close()
    assert [json.loads(line)["principal"] for line in path.read_bytes().splitlines()] == ["p0", "p1", "p2"]


def test_a_token_withheld_for_want_of_its_record_is_recorded_as_withheld_not_allowed(
        hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki, stalled: StalledPipe) -> None:
    leaf, other = new_leaf(hsm), new_leaf(hsm)
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=[OWN_DEVICE], bearer={leaf.name: leaf.bearer},
                        audit_file=stalled.path, rate_limit_per_second=0, request_timeout=1.0) as svc:
        # The writer takes this record and blocks in its write: the token's record stays queued.
        assert svc.call("POST", "/v1/sas-tokens", {"deviceId": other.name}, bearer=leaf.bearer)[0] == 403
        records = _withheld_token_records(svc, leaf, stalled)
    assert [(r["outcome"], r["status"], r["reason"]) for r in records] == [("withheld", 503, "audit-unavailable")]


def test_a_record_the_writer_already_holds_is_followed_by_one_saying_the_answer_was_withheld(
        hsm: Hsm, tmp_path: Path, emulator_pki: EmulatorPki, stalled: StalledPipe) -> None:
    leaf = new_leaf(hsm)
    with ServiceHarness(hsm, tmp_path, emulator_pki, policy=[OWN_DEVICE], bearer={leaf.name: leaf.bearer},
                        audit_file=stalled.path, rate_limit_per_second=0, request_timeout=1.0) as svc:
        # The token's record is the first: the writer holds it, blocked in its write.
        records = _withheld_token_records(svc, leaf, stalled)
    assert [(r["outcome"], r["status"]) for r in records] == [("allowed", 200), ("withheld", 503)]


def _withheld_token_records(svc: ServiceHarness, leaf: Any, stalled: StalledPipe) -> list[dict[str, Any]]:
    """Ask for a token while the audit disk is stalled (the answer is withheld: 503), then
    release the disk; the records written for that request."""
    status, _, body = svc.call("POST", "/v1/sas-tokens", {"deviceId": leaf.name}, bearer=leaf.bearer,
                               headers={"X-Request-Id": "token"})
    assert status == 503 and "nothing was handed out" in body["detail"], body
    stalled.release()
    assert svc.service is not None and svc.service.audit.flush()
    return [r for r in stalled.records() if r["requestId"] == "token"]


def test_a_record_whose_waiter_is_cancelled_says_the_answer_was_aborted(stalled: StalledPipe) -> None:
    audit = AuditLog(str(stalled.path), fail_closed=True)
    _submit(audit, 1)  # the writer takes it and blocks in write: the next record stays queued

    async def abandoned() -> None:
        waiting = asyncio.ensure_future(audit.submit(wait=True, principal="p", operation="signature",
                                                     outcome="allowed", reason="policy rule 0", status=200,
                                                     request_id="cancelled"))
        await asyncio.sleep(0)  # queued
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(abandoned())
    stalled.release()
    assert audit.flush()
    audit.close()
    records = [r for r in stalled.records() if r["requestId"] == "cancelled"]
    assert [(r["outcome"], r["status"], r["reason"]) for r in records] == [("aborted", None, "cancelled")]
