"""Every error the package raises has a kind, and the CLI's exit code and the API's HTTP status
are both looked up from it: no package error reaches a user as a traceback or a 500."""

from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil
from collections.abc import Iterator
from types import ModuleType

import pytest

import spyrus_hsm
from spyrus_hsm.cli import EXIT_CODES, EXIT_FAILED, EXIT_USAGE
from spyrus_hsm.errors import Kind, SpyrusError
from spyrus_hsm.hsm import errors as hsm_errors
from spyrus_hsm.identity.tls import ProviderError
from spyrus_hsm.identity.x509 import ChainError
from spyrus_hsm.service.problems import HTTP, Problem, from_exception

RETRY_AFTER = 7


def _modules() -> list[ModuleType]:
    names = [m.name for m in pkgutil.walk_packages(spyrus_hsm.__path__, "spyrus_hsm.")]
    return [importlib.import_module(n) for n in names if not n.endswith(".__main__")]  # __main__ runs the CLI


MODULES = _modules()  # imported first, so that every error class exists for the walk below


def _subclasses(cls: type[SpyrusError]) -> Iterator[type[SpyrusError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


ERRORS = sorted(set(_subclasses(SpyrusError)), key=lambda c: f"{c.__module__}.{c.__qualname__}")


def test_the_walk_finds_the_errors_of_every_layer() -> None:
    names = {c.__name__ for c in ERRORS}
    assert {"HsmError", "HsmBusy", "ConfigError", "UsageError", "UriError", "SasError", "ChainError",
            "ProviderError", "RegistrationError", "AuditError", "TwinConfigError"} <= names


def test_every_exception_class_of_the_package_is_on_the_one_root() -> None:
    """Problem is the HTTP rendering itself; private classes never leave their module."""
    stray = [f"{m.__name__}.{name}" for m in MODULES for name, obj in vars(m).items()
             if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == m.__name__
             and not issubclass(obj, SpyrusError) and obj is not Problem and not name.startswith("_")]
    assert stray == []


def test_both_tables_answer_every_kind() -> None:
    assert set(EXIT_CODES) == set(Kind) == set(HTTP)
    assert set(EXIT_CODES.values()) == {EXIT_FAILED, EXIT_USAGE}
    assert all(400 <= a.status < 500 or a.status in (502, 503) for a in HTTP.values())


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__qualname__)
def test_an_error_maps_to_an_exit_code_and_an_http_problem_by_its_kind(cls: type[SpyrusError]) -> None:
    exc = cls.__new__(cls)  # as raised, whatever its constructor takes
    Exception.__init__(exc, "what went wrong and what to do")
    assert isinstance(exc.kind, Kind)
    assert EXIT_CODES[exc.kind] in (EXIT_FAILED, EXIT_USAGE)
    problem = from_exception(exc, RETRY_AFTER)
    assert problem is not None
    assert problem.status < 500 or problem.status in (502, 503), problem
    assert (problem.status, problem.type) == (HTTP[exc.kind].status, HTTP[exc.kind].type)
    assert (problem.retry_after == RETRY_AFTER) == HTTP[exc.kind].retry


def test_a_local_chain_problem_is_a_credential_error_not_a_dps_failure() -> None:
    exc = ChainError("certificate 'CN=dev1' is not issued by 'CN=other CA'")
    problem = from_exception(exc, RETRY_AFTER)
    assert problem is not None
    assert (problem.status, problem.type) == (422, "credential-invalid")
    assert problem.detail == ChainError.public_detail and "CN=" not in problem.detail  # the subjects: logged
    assert EXIT_CODES[exc.kind] == EXIT_FAILED


OPERATORS_TEXT = ("no credential 'x'; credentials present: 'service-tls' (CN module); PIN file /etc/spyrus/pin; "
                  "reader 'Virtual PCD 00 00'; import one with 'spyrus-hsm key import-pkcs12'")


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__qualname__)
def test_a_caller_is_told_no_message_of_an_error_that_has_no_public_text_and_the_log_has_it(
        cls: type[SpyrusError], caplog: pytest.LogCaptureFixture) -> None:
    exc = cls.__new__(cls)  # as raised, whatever its constructor takes
    Exception.__init__(exc, OPERATORS_TEXT)
    caplog.set_level("DEBUG", logger="spyrus_hsm.service.problems")
    problem = from_exception(exc, RETRY_AFTER, "POST /v1/x (request r1)")
    assert problem is not None and problem.detail
    assert problem.detail in (cls.public_detail, HTTP[exc.kind].detail)
    assert not any(word in problem.detail for word in ("present", "/etc", "PCD", "spyrus-hsm", "service-tls"))
    assert [r.getMessage() for r in caplog.records] == [
        f"POST /v1/x (request r1) answered {problem.status} {problem.type}: {OPERATORS_TEXT}"]
    # A busy, absent or slow HSM is answered thousands of times in a storm: those lines are DEBUG
    # (the HSM's own state is logged once where it changes).
    transient = exc.kind in (Kind.BUSY, Kind.UNAVAILABLE, Kind.TIMEOUT)
    assert caplog.records[0].levelno == (logging.DEBUG if transient else
                                         logging.ERROR if exc.kind is Kind.CONFIG else
                                         logging.WARNING if problem.status >= 500 else logging.INFO)


def test_an_error_raised_with_public_text_tells_the_caller_that_and_logs_the_rest(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="spyrus_hsm.service.problems")
    exc = hsm_errors.ObjectNotFound(OPERATORS_TEXT, public="no secret-key object labelled 'x'")
    problem = from_exception(exc, RETRY_AFTER)
    assert problem is not None and problem.detail == "no secret-key object labelled 'x'"
    assert OPERATORS_TEXT in caplog.text
    caplog.clear()
    same = hsm_errors.InvalidInput("'csr' is not a CSR", public="'csr' is not a CSR")
    assert from_exception(same, RETRY_AFTER) is not None and caplog.records == []  # nothing withheld: no line


def test_a_missing_pkcs11_provider_is_503_not_configured_without_the_path() -> None:
    exc = ProviderError("pkcs11-provider is not installed (/usr/lib/x/ossl-modules/pkcs11.so is missing)")
    problem = from_exception(exc, RETRY_AFTER)
    assert problem is not None
    assert (problem.status, problem.type) == (503, "not-configured")
    assert problem.detail and "ossl-modules" not in problem.detail
    assert EXIT_CODES[exc.kind] == EXIT_USAGE


@pytest.mark.parametrize(("cls", "status", "kind"), [
    (hsm_errors.HsmBusy, 503, "hsm-busy"),
    (hsm_errors.HsmTimeout, 503, "hsm-timeout"),
    (hsm_errors.HsmUnavailable, 503, "hsm-unavailable"),
    (hsm_errors.LoginFailed, 503, "hsm-unavailable"),
    (hsm_errors.ObjectNotFound, 404, "not-found"),
    (hsm_errors.InvalidInput, 400, "invalid-request"),
    (hsm_errors.OperationFailed, 422, "operation-failed"),
])
def test_hsm_errors_keep_their_problem_types(cls: type[hsm_errors.HsmError], status: int, kind: str) -> None:
    problem = from_exception(cls("token 'edge': something"), RETRY_AFTER)
    assert problem is not None and (problem.status, problem.type) == (status, kind)


def test_an_error_from_outside_the_package_is_left_to_the_500_handler() -> None:
    assert from_exception(KeyError("bug"), RETRY_AFTER) is None


def test_callers_refused_by_a_full_hsm_queue_are_spread_over_its_drain_time() -> None:
    busy = hsm_errors.HsmBusy("the HSM queue is full", drain_seconds=20.0)
    waits = []
    for _ in range(50):
        problem = from_exception(busy, 1)
        assert problem is not None and problem.type == "hsm-busy"
        assert problem.retry_after is not None
        waits.append(problem.retry_after)
    assert all(10 <= w <= 20 for w in waits), waits
    assert len(set(waits)) > 1, "every caller told to come back at the same moment"


def test_without_a_drain_time_a_full_queue_answers_the_configured_retry_after() -> None:
    for drain in (None, 0.0):
        problem = from_exception(hsm_errors.HsmBusy("full", drain_seconds=drain), 7)
        assert problem is not None and problem.retry_after == 7
    short = from_exception(hsm_errors.HsmBusy("full", drain_seconds=0.5), 7)
    assert short is not None and short.retry_after == 7  # never sooner than configured


def test_an_exception_is_told_in_one_line_the_one_way() -> None:
    """errors.one_line: ours by its message, another's by type and message with the cause that
    adds something, white space folded, bounded."""
    from spyrus_hsm.errors import one_line
    from spyrus_hsm.hsm import HsmTimeout

    told = one_line(HsmTimeout("signing with 'k': no answer\n within 10 s"))
    assert told == "signing with 'k': no answer within 10 s"
    try:
        try:
            raise ConnectionRefusedError("Connection refused: not authorised")
        except ConnectionRefusedError as cause:
            raise RuntimeError("connect failed") from cause
    except RuntimeError as exc:
        assert one_line(exc) == ("RuntimeError: connect failed "
                                 "(ConnectionRefusedError: Connection refused: not authorised)")
    assert one_line(ValueError()) == "ValueError"
    assert len(one_line(ValueError("x" * 2000), limit=80)) == 80
