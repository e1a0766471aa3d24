"""Every exception azure-iot-device raises on connect, send and twin calls, in the package's error
kinds (sdkerrors.translate): one line naming the hub, the identity, what was being done and why."""

from __future__ import annotations

import pytest
from azure.iot.device import exceptions as sdk

from spyrus_hsm.errors import Kind, SpyrusError
from spyrus_hsm.sdkerrors import HubCredentialRefused, HubError, HubTimeout, translate

HUB, WHO = "hub.example", "dev-1"


@pytest.mark.parametrize(("raised", "kind", "cls", "says"), [
    (sdk.CredentialError("CONNACK 5"), Kind.CREDENTIAL, HubCredentialRefused, "refused the credential while sending"),
    (sdk.OperationTimeout("no PUBACK"), Kind.TIMEOUT, HubTimeout, "did not answer while sending"),
    (TimeoutError("lane full"), Kind.TIMEOUT, HubTimeout, "did not answer while sending"),
    (sdk.ConnectionDroppedError("socket closed"), Kind.UPSTREAM, HubError, "dropped the connection while sending"),
    (sdk.NoConnectionError("not connected"), Kind.UPSTREAM, HubError, "dropped the connection while sending"),
    (sdk.ConnectionFailedError("refused"), Kind.UPSTREAM, HubError, "cannot connect to IoT Hub"),
    (sdk.ClientError("bad"), Kind.UPSTREAM, HubError, "failed while sending"),
    (sdk.ServiceError("500"), Kind.UPSTREAM, HubError, "failed while sending"),
    (sdk.OperationCancelled("cancelled"), Kind.UPSTREAM, HubError, "failed while sending"),
    (OSError("[Errno 104] reset"), Kind.UPSTREAM, HubError, "failed while sending"),
])
def test_each_sdk_exception_maps_to_one_kind_and_one_line(raised: BaseException, kind: Kind, cls: type,
                                                           says: str) -> None:
    mapped = translate(raised, HUB, WHO, "sending")
    assert type(mapped) is cls and isinstance(mapped, SpyrusError) and mapped.kind is kind
    text = str(mapped)
    assert says in text and f"{HUB}" in text and "\n" not in text
    assert str(raised).split()[0] in text, "the reason is kept"


def test_the_reason_is_found_along_the_cause_chain_and_bounded() -> None:
    try:
        try:
            raise OSError("x" * 1000)
        except OSError as inner:
            raise sdk.ConnectionFailedError() from inner
    except sdk.ConnectionFailedError as exc:
        mapped = translate(exc, HUB, WHO, "connecting")
    text = str(mapped)
    assert "OSError: xxx" in text and len(text) < 400


def test_ours_pass_through_and_a_bug_of_ours_keeps_its_type() -> None:
    ours = HubError("already ours")
    assert translate(ours, HUB, WHO, "sending") is ours
    bug = TypeError("a bug")
    assert translate(bug, HUB, WHO, "sending") is bug
