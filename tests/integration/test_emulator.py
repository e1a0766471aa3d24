"""The IoT Hub + DPS emulator, exercised with the real azure-iot-device SDK (software keys).

Each test is one behaviour of Azure that our client code relies on: what is accepted, and
that what Azure refuses is refused the same way (CONNACK 5 -> CredentialError).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import addresses
import pytest
from azure.iot.device import (
    X509,
    IoTHubDeviceClient,
    IoTHubModuleClient,
    Message,
    MethodResponse,
    ProvisioningDeviceClient,
)
from azure.iot.device.exceptions import ConnectionFailedError, CredentialError

from emulator import Emulator, derive_group_key, make_sas_token, mqtt, new_symmetric_key
from emulator.config import ConfigError, build_emulator, load_config
from emulator.pki import EmulatorPki, PemFiles, make_ca

HOST = addresses.host()
ID_SCOPE = "0ne00000001"

pytestmark = [
    pytest.mark.timeout(30),
    # azure-iot-device 2.14 itself uses the deprecated ssl.PROTOCOL_TLSv1_2.
    pytest.mark.filterwarnings("ignore:ssl.PROTOCOL_TLSv1_2 is deprecated:DeprecationWarning"),
]


@pytest.fixture
def emu(make_emulator: Callable[..., Emulator]) -> Emulator:
    return make_emulator(HOST, id_scope=ID_SCOPE)


@pytest.fixture
def connect_sas(
    emu: Emulator, emulator_pki: EmulatorPki, sdk_clients: Callable[[Any], Any]
) -> Callable[..., IoTHubDeviceClient]:
    """Connect a SAS device client: ``connect_sas("dev1", key)``."""

    def connect(device_id: str, key: str) -> IoTHubDeviceClient:
        client = sdk_clients(
            IoTHubDeviceClient.create_from_connection_string(
                f"HostName={HOST};DeviceId={device_id};SharedAccessKey={key}",
                server_verification_cert=emulator_pki.ca_pem,
            )
        )
        client.connect()
        return client

    return connect


def x509_client(
    files: PemFiles, device_id: str, pki: EmulatorPki, track: Callable[[Any], Any]
) -> IoTHubDeviceClient:
    return track(
        IoTHubDeviceClient.create_from_x509_certificate(
            X509(str(files.cert_file), str(files.key_file)),
            hostname=HOST,
            device_id=device_id,
            server_verification_cert=pki.ca_pem,
        )
    )


def dps_sas_client(
    registration_id: str, key: str, pki: EmulatorPki, track: Callable[[Any], Any]
) -> ProvisioningDeviceClient:
    return track(
        ProvisioningDeviceClient.create_from_symmetric_key(
            provisioning_host=HOST,
            registration_id=registration_id,
            id_scope=ID_SCOPE,
            symmetric_key=key,
            server_verification_cert=pki.ca_pem,
        )
    )


# --- raw MQTT, for what the SDK cannot be made to send ---------------------------------------


class RawClient:
    """A bare TLS socket speaking bytes, to send tokens and packets the SDK never would."""

    def __init__(self, pki: EmulatorPki) -> None:
        context = ssl.create_default_context(cadata=pki.ca_pem)
        self.sock = context.wrap_socket(socket.create_connection((HOST, 8883), timeout=5),
                                        server_hostname=HOST)  # fmt: skip

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self) -> tuple[int, bytes] | None:
        """(first byte, body) of the next packet, or None once the server closed."""
        try:
            first = self._exactly(1)
            length, shift = 0, 0
            while True:
                byte = self._exactly(1)[0]
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            return first[0], self._exactly(length)
        except (EOFError, ConnectionError, ssl.SSLError):
            return None

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def connect(self, client_id: str, username: str, password: str | None) -> int | None:
        """CONNECT; the CONNACK return code, or None if closed without one."""
        self.send(mqtt.encode_connect(mqtt.Connect(
            client_id, username, password.encode() if password else None)))  # fmt: skip
        packet = self.read()
        return packet[1][1] if packet and packet[0] >> 4 == mqtt.PacketType.CONNACK else None

    def closed_by_server(self) -> bool:
        return self.read() is None

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(emu: Emulator, emulator_pki: EmulatorPki) -> Any:
    clients: list[RawClient] = []

    def open_client() -> RawClient:
        clients.append(RawClient(emulator_pki))
        return clients[-1]

    yield open_client
    for client in clients:
        client.close()


def hub_username(client_id: str) -> str:
    return f"{HOST}/{client_id}/?api-version=2019-10-01"


def hub_token(key: str, device_id: str, ttl: int = 3600) -> str:
    return make_sas_token(key, f"{HOST}/devices/{device_id}", int(time.time()) + ttl)


# --- IoT Hub, SAS ------------------------------------------------------------------------------


def test_sas_device_telemetry_is_recorded_with_its_properties(
    emu: Emulator, connect_sas: Callable[..., IoTHubDeviceClient]
) -> None:
    key = new_symmetric_key()
    emu.add_device("dev1", symmetric_key=key)
    client = connect_sas("dev1", key)
    message = Message('{"t": 21.5}', content_encoding="utf-8", content_type="application/json")
    message.custom_properties["site"] = "lab 1"
    client.send_message(message)

    [record] = emu.received.telemetry
    assert (record.device_id, record.module_id) == ("dev1", None)
    assert record.json() == {"t": 21.5}
    assert record.properties["site"] == "lab 1"
    assert record.properties["$.ct"] == "application/json"
    assert emu.received.accepted_connects("dev1")[0].auth_method == "sas"


def test_wrong_symmetric_key_is_refused_with_credential_error(
    emu: Emulator, connect_sas: Callable[..., IoTHubDeviceClient]
) -> None:
    emu.add_device("dev1", symmetric_key=new_symmetric_key())
    with pytest.raises(CredentialError):
        connect_sas("dev1", new_symmetric_key())
    [refusal] = emu.received.refused_connects("dev1")
    assert refusal.return_code == 5
    assert "signature" in refusal.outcome


def test_secondary_key_is_accepted(
    emu: Emulator, connect_sas: Callable[..., IoTHubDeviceClient]
) -> None:
    secondary = new_symmetric_key()
    emu.add_device("dev1", symmetric_key=new_symmetric_key(), secondary_key=secondary)
    connect_sas("dev1", secondary)
    assert emu.received.accepted_connects("dev1")


def test_unregistered_device_is_refused_with_credential_error(
    emu: Emulator, connect_sas: Callable[..., IoTHubDeviceClient]
) -> None:
    with pytest.raises(CredentialError):
        connect_sas("ghost", new_symmetric_key())


@pytest.mark.timeout(15)
def test_expired_sas_token_is_refused_with_credential_error(
    emu: Emulator, emulator_pki: EmulatorPki, sdk_clients: Callable[[Any], Any]
) -> None:
    key = new_symmetric_key()
    emu.add_device("dev1", symmetric_key=key)
    expiry = int(time.time()) + 1
    token = make_sas_token(key, f"{HOST}/devices/dev1", expiry)
    client = sdk_clients(IoTHubDeviceClient.create_from_sastoken(
        token, server_verification_cert=emulator_pki.ca_pem))  # fmt: skip
    time.sleep(max(0.0, expiry - time.time()) + 0.2)
    with pytest.raises(CredentialError):
        client.connect()
    assert "expired" in emu.received.refused_connects("dev1")[0].outcome


def test_sas_token_signed_for_another_device_is_refused(emu: Emulator, raw: Any) -> None:
    other_key = new_symmetric_key()
    emu.add_device("dev1", symmetric_key=new_symmetric_key())
    emu.add_device("dev2", symmetric_key=other_key)
    code = raw().connect("dev1", hub_username("dev1"), hub_token(other_key, "dev2"))
    assert code == 5
    assert "is not" in emu.received.refused_connects("dev1")[0].outcome


def test_client_id_must_match_the_username(emu: Emulator, raw: Any) -> None:
    key = new_symmetric_key()
    emu.add_device("dev1", symmetric_key=key)
    assert raw().connect("dev2", hub_username("dev1"), hub_token(key, "dev1")) == 5


def test_policy_style_token_with_skn_is_refused_for_a_device(emu: Emulator, raw: Any) -> None:
    key = new_symmetric_key()
    emu.add_device("dev1", symmetric_key=key)
    token = make_sas_token(key, f"{HOST}/devices/dev1", int(time.time()) + 60, "device")
    assert raw().connect("dev1", hub_username("dev1"), token) == 5


@pytest.mark.timeout(10)
def test_connection_is_closed_when_its_sas_token_expires(emu: Emulator, raw: Any) -> None:
    key = new_symmetric_key()
    emu.add_device("dev1", symmetric_key=key)
    client = raw()
    assert client.connect("dev1", hub_username("dev1"), hub_token(key, "dev1", ttl=1)) == 0
    assert client.closed_by_server()
    assert emu.wait_for(lambda: emu.received.disconnects)[0].reason == "SAS token expired"


def test_module_client_connects_and_sends_telemetry(
    emu: Emulator, emulator_pki: EmulatorPki, sdk_clients: Callable[[Any], Any]
) -> None:
    key = new_symmetric_key()
    emu.add_device("edge1", symmetric_key=new_symmetric_key())
    emu.add_module("edge1", "spyrus_hsm", symmetric_key=key)
    client = sdk_clients(IoTHubModuleClient.create_from_connection_string(
        f"HostName={HOST};DeviceId=edge1;ModuleId=spyrus_hsm;SharedAccessKey={key}",
        server_verification_cert=emulator_pki.ca_pem))  # fmt: skip
    client.connect()
    client.send_message_to_output(Message("m"), "status")

    [record] = emu.received.telemetry
    assert (record.device_id, record.module_id) == ("edge1", "spyrus_hsm")
    assert record.properties["$.on"] == "status"


def test_device_key_does_not_authenticate_its_module(emu: Emulator, raw: Any) -> None:
    device_key = new_symmetric_key()
    emu.add_device("edge1", symmetric_key=device_key)
    emu.add_module("edge1", "mod", symmetric_key=new_symmetric_key())
    token = make_sas_token(device_key, f"{HOST}/devices/edge1/modules/mod", int(time.time()) + 60)
    assert raw().connect("edge1/mod", hub_username("edge1/mod"), token) == 5


# --- IoT Hub, X.509 ------------------------------------------------------------------------


def test_x509_device_with_chain_to_the_enrolled_ca_connects(
    emu: Emulator, emulator_pki: EmulatorPki, sdk_clients: Callable[[Any], Any]
) -> None:
    emu.add_device("dev2", x509_ca_pem=emulator_pki.root.cert_pem)
    client = x509_client(emulator_pki.device("dev2"), "dev2", emulator_pki, sdk_clients)
    client.connect()
    client.send_message("hi")
    assert emu.received.accepted_connects("dev2")[0].auth_method == "x509"
    assert emu.received.telemetry[0].payload == b"hi"


def test_x509_device_enrolled_with_an_intermediate_ca_connects(
    emu: Emulator, emulator_pki: EmulatorPki, sdk_clients: Callable[[Any], Any]
) -> None:
    emu.add_device("dev2", x509_ca_pem=emulator_pki.intermediate.cert_pem)
    x509_client(emulator_pki.device("dev2"), "dev2", emulator_pki, sdk_clients).connect()
    assert emu.received.accepted_connects("dev2")


def test_x509_certificate_of_another_known_ca_is_refused_with_credential_error(
    emu: Emulator, emulator_pki: EmulatorPki, sdk_clients: Callable[[Any], Any]
) -> None:
    other_ca = make_ca("Other Tenant CA")
    emu.add_device("dev2", x509_ca_pem=emulator_pki.root.cert_pem)
    emu.add_device("other", x509_ca_pem=other_ca.cert_pem)  # makes other_ca known to TLS
    files = emulator_pki.device("dev2", other_ca)
    with pytest.raises(CredentialError):
        x509_client(files, "dev2", emulator_pki, sdk_clients).connect()
    assert "does not lead to the CA" in emu.received.refused_connects("dev2")[0].outcome


def test_x509_certificate_with_another_cn_is_refused_with_credential_error(
    emu: Emulator, emulator_pki: EmulatorPki, sdk_clients: Callable[[Any], Any]
) -> None:
    emu.add_device("dev2", x509_ca_pem=emulator_pki.root.cert_pem)
    emu.add_device("dev3", x509_ca_pem=emulator_pki.root.cert_pem)
    with pytest.raises(CredentialError):
        x509_client(emulator_pki.device("dev3"), "dev2", emulator_pki, sdk_clients).connect()
    assert "CN 'dev3'" in emu.received.refused_connects("dev2")[0].outcome


def test_expired_x509_certificate_is_refused_with_credential_error(
    emu: Emulator, emulator_pki: EmulatorPki, sdk_clients: Callable[[Any], Any]
) -> None:
    emu.add_device("dev2", x509_ca_pem=emulator_pki.root.cert_pem)
    now = dt.datetime.now(dt.UTC)
    files = emulator_pki.device(
        "dev2", not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)
    )
    with pytest.raises(CredentialError):
        x509_client(files, "dev2", emulator_pki, sdk_clients).connect()
    assert "not valid now" in emu.received.refused_connects("dev2")[0].outcome


@pytest.mark.timeout(15)
def test_x509_certificate_of_an_unknown_ca_fails_at_tls(
    emu: Emulator, emulator_pki: EmulatorPki, sdk_clients: Callable[[Any], Any]
) -> None:
    emu.add_device("dev2", x509_ca_pem=emulator_pki.root.cert_pem)
    files = emulator_pki.device("dev2", make_ca("Nobody's CA"))
    with pytest.raises(ConnectionFailedError):  # not CredentialError: see emulator.server
        x509_client(files, "dev2", emulator_pki, sdk_clients).connect()
    [refusal] = emu.wait_for(lambda: emu.received.connects)
    assert refusal.outcome.startswith("TLS handshake failed")


# --- twins and methods ------------------------------------------------------------------------


def test_twin_get_returns_desired_and_reported_with_versions(
    emu: Emulator, connect_sas: Callable[..., IoTHubDeviceClient]
) -> None:
    key = new_symmetric_key()
    emu.add_device("dev1", symmetric_key=key)
    emu.send_desired_patch("dev1", {"interval": 30})
    twin = connect_sas("dev1", key).get_twin()
    assert twin["desired"] == {"interval": 30, "$version": 2}
    assert twin["reported"] == {"$version": 1}


def test_reported_patch_is_recorded_and_versioned(
    emu: Emulator, connect_sas: Callable[..., IoTHubDeviceClient]
) -> None:
    key = new_symmetric_key()
    emu.add_device("dev1", symmetric_key=key)
    client = connect_sas("dev1", key)
    client.patch_twin_reported_properties({"hsm": {"ready": True, "slot": 1}})
    client.patch_twin_reported_properties({"hsm": {"slot": None}})

    assert [p.version for p in emu.received.reported_patches] == [2, 3]
    assert emu.twin("dev1")["reported"] == {"hsm": {"ready": True}, "$version": 3}


def test_desired_patch_reaches_the_connected_client(
    emu: Emulator, connect_sas: Callable[..., IoTHubDeviceClient]
) -> None:
    key = new_symmetric_key()
    emu.add_device("dev1", symmetric_key=key)
    client = connect_sas("dev1", key)
    patches: queue.Queue[dict[str, Any]] = queue.Queue()
    client.on_twin_desired_properties_patch_received = patches.put

    version = emu.send_desired_patch("dev1", {"logLevel": "debug"})
    assert patches.get(timeout=5) == {"logLevel": "debug", "$version": version}


def test_direct_method_round_trip(
    emu: Emulator, connect_sas: Callable[..., IoTHubDeviceClient]
) -> None:
    key = new_symmetric_key()
    emu.add_device("dev1", symmetric_key=key)
    client = connect_sas("dev1", key)

    def handler(request: Any) -> None:
        reply = {"echo": request.payload, "name": request.name}
        client.send_method_response(MethodResponse.create_from_method_request(request, 201, reply))

    client.on_method_request_received = handler
    status, payload = emu.invoke_method("dev1", "rotate", {"slot": 2})
    assert (status, payload) == (201, {"echo": {"slot": 2}, "name": "rotate"})


def test_direct_method_to_an_offline_device_is_404(emu: Emulator) -> None:
    emu.add_device("dev1", symmetric_key=new_symmetric_key())
    status, payload = emu.invoke_method("dev1", "rotate")
    assert status == 404
    assert payload["errorCode"] == 404103


def test_c2d_message_reaches_the_device(
    emu: Emulator, connect_sas: Callable[..., IoTHubDeviceClient]
) -> None:
    key = new_symmetric_key()
    emu.add_device("dev1", symmetric_key=key)
    client = connect_sas("dev1", key)
    messages: queue.Queue[Message] = queue.Queue()
    client.on_message_received = messages.put
    assert emu.send_message("dev1", "reboot", properties={"urgent": "yes"})
    message = messages.get(timeout=5)
    assert (message.data, message.custom_properties["urgent"]) == (b"reboot", "yes")


# --- connections ------------------------------------------------------------------------------


def test_second_connection_with_the_same_client_id_drops_the_first(
    emu: Emulator, raw: Any
) -> None:
    key = new_symmetric_key()
    emu.add_device("dev1", symmetric_key=key)
    first, second = raw(), raw()
    assert first.connect("dev1", hub_username("dev1"), hub_token(key, "dev1")) == 0
    assert second.connect("dev1", hub_username("dev1"), hub_token(key, "dev1")) == 0
    assert first.closed_by_server()
    assert emu.connected() == ["dev1"]
    [dropped] = emu.wait_for(lambda: emu.received.disconnects)
    assert dropped.reason.startswith("replaced by a new connection")


def test_sdk_subscriptions_survive_a_dropped_connection(
    emu: Emulator, connect_sas: Callable[..., IoTHubDeviceClient]
) -> None:
    """The SDK connects with CleanSession=0 and does not subscribe again after reconnecting:
    like IoT Hub and edgeHub, the emulator keeps its subscriptions (Azure/iotedge#5048)."""
    key = new_symmetric_key()
    emu.add_device("dev1", symmetric_key=key)
    client = connect_sas("dev1", key)
    patches: queue.Queue[dict[str, Any]] = queue.Queue()
    client.on_twin_desired_properties_patch_received = patches.put
    assert emu.drop_connection("dev1")
    emu.wait_for(lambda: len(emu.received.accepted_connects("dev1")) == 2, timeout=20)

    version = emu.send_desired_patch("dev1", {"interval": 5})
    assert patches.get(timeout=5) == {"interval": 5, "$version": version}
    assert client.get_twin()["desired"]["$version"] == version


def test_clean_session_0_resumes_subscriptions_and_clean_session_1_drops_them(
    emu: Emulator, raw: Any
) -> None:
    key = new_symmetric_key()
    emu.add_device("dev1", symmetric_key=key)

    def connect(clean_session: bool) -> tuple[RawClient, int]:
        client = raw()
        client.send(mqtt.encode_connect(mqtt.Connect("dev1", hub_username("dev1"), hub_token(key, "dev1").encode(),
                                                     clean_session=clean_session)))
        connack = client.read()
        assert connack is not None and connack[1][1] == 0
        return client, connack[1][0]  # session present

    first, present = connect(clean_session=False)
    assert present == 0
    first.send(mqtt.encode_subscribe(mqtt.Subscribe(1, (("$iothub/methods/POST/#", 1),))))
    assert first.read() is not None  # SUBACK
    first.send(mqtt.encode_disconnect())
    emu.wait_for(lambda: not emu.connected())

    resumed, present = connect(clean_session=False)
    assert present == 1
    assert emu.invoke_method("dev1", "ping", timeout=0.5)[0] == 504  # delivered, never answered
    request = resumed.read()
    assert request is not None and request[0] >> 4 == mqtt.PacketType.PUBLISH
    resumed.send(mqtt.encode_disconnect())
    emu.wait_for(lambda: not emu.connected())

    _, present = connect(clean_session=True)
    assert present == 0
    assert emu.invoke_method("dev1", "ping")[0] == 404  # not subscribed any more


@pytest.mark.parametrize(
    "packet",
    [
        pytest.param(mqtt.encode_pingreq(), id="pingreq-before-connect"),
        pytest.param(b"\x10\xff\xff\xff\xff\x01", id="remaining-length-over-4-bytes"),
        pytest.param(b"\xf0\x00", id="reserved-packet-type"),
        pytest.param(b"\x10\x0c\x00\x04MQTT\x04\x03\x00\x3c\x00\x00", id="reserved-connect-flag"),
    ],
)
def test_malformed_or_out_of_order_first_packet_closes_the_connection(
    emu: Emulator, raw: Any, packet: bytes
) -> None:
    client = raw()
    client.send(packet)
    assert client.closed_by_server()


@pytest.mark.parametrize(
    "packet",
    [
        pytest.param(
            mqtt.encode_publish(mqtt.Publish("devices/dev1/messages/events/", b"x", 2, 7)),
            id="qos2-publish",
        ),
        pytest.param(
            mqtt.encode_publish(mqtt.Publish("devices/dev2/messages/events/", b"x")),
            id="publish-as-another-device",
        ),
        pytest.param(b"\x82\x05\x00\x01\x00\x01a", id="truncated-subscribe"),
        pytest.param(b"\x80\x06\x00\x01\x00\x01a\x01", id="subscribe-with-wrong-flags"),
    ],
)
def test_protocol_violation_after_connect_closes_the_connection(
    emu: Emulator, raw: Any, packet: bytes
) -> None:
    key = new_symmetric_key()
    emu.add_device("dev1", symmetric_key=key)
    client = raw()
    assert client.connect("dev1", hub_username("dev1"), hub_token(key, "dev1")) == 0
    client.send(packet)
    assert client.closed_by_server()
    assert not emu.received.telemetry


def test_subscription_outside_the_azure_topics_is_refused_in_suback(
    emu: Emulator, raw: Any
) -> None:
    key = new_symmetric_key()
    emu.add_device("dev1", symmetric_key=key)
    client = raw()
    assert client.connect("dev1", hub_username("dev1"), hub_token(key, "dev1")) == 0
    client.send(mqtt.encode_subscribe(mqtt.Subscribe(1, (("#", 1), ("$iothub/methods/POST/#", 2)))))
    packet = client.read()
    assert packet is not None and packet[0] >> 4 == mqtt.PacketType.SUBACK
    assert list(packet[1][2:]) == [0x80, 1]


def test_sas_keys_and_signatures_never_reach_the_logs(
    emu: Emulator,
    connect_sas: Callable[..., IoTHubDeviceClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = new_symmetric_key()
    emu.add_device("dev1", symmetric_key=key)
    with caplog.at_level(logging.DEBUG, logger="emulator"):
        with pytest.raises(CredentialError):
            connect_sas("dev1", new_symmetric_key())
        connect_sas("dev1", key).send_message("x")
    text = caplog.text + repr(emu.received)
    assert "sig=" not in text and key not in text
    assert "SharedAccessSignature" not in text


@pytest.mark.timeout(10)
def test_stop_is_quick_with_clients_connected(
    emu: Emulator, connect_sas: Callable[..., IoTHubDeviceClient]
) -> None:
    key = new_symmetric_key()
    emu.add_device("dev1", symmetric_key=key)
    connect_sas("dev1", key)
    started = time.monotonic()
    emu.stop()
    assert time.monotonic() - started < 1.5
    assert not any(t.name == f"emulator-{HOST}" for t in threading.enumerate())


# --- DPS ---------------------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_dps_symmetric_key_individual_enrollment_is_assigned_after_polling(
    emu: Emulator, emulator_pki: EmulatorPki, sdk_clients: Callable[[Any], Any]
) -> None:
    key = new_symmetric_key()
    emu.add_individual_enrollment("reg1", symmetric_key=key, device_id="edge-reg1")
    client = dps_sas_client("reg1", key, emulator_pki, sdk_clients)
    client.provisioning_payload = {"modelId": "dtmi:spyrus:hsm;1"}
    result = client.register()

    assert result.status == "assigned"
    state = result.registration_state
    assert (state.assigned_hub, state.device_id, state.sub_status) == (
        HOST, "edge-reg1", "initialAssignment")  # fmt: skip
    assert json.loads(state.response_payload) == {"modelId": "dtmi:spyrus:hsm;1"}
    [register] = emu.received.registrations
    assert (register.status_code, register.payload) == (202, {"modelId": "dtmi:spyrus:hsm;1"})


@pytest.mark.timeout(20)
def test_dps_group_enrollment_accepts_the_derived_device_key(
    emu: Emulator, emulator_pki: EmulatorPki, sdk_clients: Callable[[Any], Any]
) -> None:
    group_key = new_symmetric_key()
    emu.add_group_enrollment("fleet", symmetric_key=group_key)
    emu.polls_before_assigned = 0
    device_key = derive_group_key(group_key, "unit-0042")
    result = dps_sas_client("unit-0042", device_key, emulator_pki, sdk_clients).register()

    assert result.registration_state.device_id == "unit-0042"
    assert emu.received.assignments[0].enrollment == "group:fleet"


@pytest.mark.timeout(20)
def test_dps_group_key_itself_is_not_a_device_key(
    emu: Emulator, emulator_pki: EmulatorPki, sdk_clients: Callable[[Any], Any]
) -> None:
    group_key = new_symmetric_key()
    emu.add_group_enrollment("fleet", symmetric_key=group_key)
    with pytest.raises(CredentialError):
        dps_sas_client("unit-0042", group_key, emulator_pki, sdk_clients).register()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("kind", ["individual", "group"])
def test_dps_x509_enrollment_is_assigned(
    emu: Emulator, emulator_pki: EmulatorPki, sdk_clients: Callable[[Any], Any], kind: str
) -> None:
    if kind == "group":
        emu.add_group_enrollment("x509-fleet", x509_ca_pem=emulator_pki.root.cert_pem)
    else:
        emu.add_individual_enrollment("unit-x1", x509_ca_pem=emulator_pki.intermediate.cert_pem)
    emu.polls_before_assigned = 0
    files = emulator_pki.device("unit-x1")
    client = sdk_clients(ProvisioningDeviceClient.create_from_x509_certificate(
        provisioning_host=HOST, registration_id="unit-x1", id_scope=ID_SCOPE,
        x509=X509(str(files.cert_file), str(files.key_file)),
        server_verification_cert=emulator_pki.ca_pem))  # fmt: skip
    result = client.register()
    assert result.status == "assigned"
    assert emu.received.accepted_connects("unit-x1")[0].auth_method == "x509"
    assert emu.received.assignments[0].enrollment.startswith(kind)


@pytest.mark.timeout(20)
def test_dps_throttled_registration_is_retried_after_retry_after(
    emu: Emulator, emulator_pki: EmulatorPki, sdk_clients: Callable[[Any], Any]
) -> None:
    key = new_symmetric_key()
    emu.add_individual_enrollment("reg1", symmetric_key=key)
    emu.polls_before_assigned = 0
    emu.throttle_dps(times=1, retry_after=1)
    result = dps_sas_client("reg1", key, emulator_pki, sdk_clients).register()

    assert result.status == "assigned"
    assert [r.status_code for r in emu.received.registrations] == [429, 200]


@pytest.mark.timeout(20)
def test_dps_wrong_key_is_refused_with_credential_error(
    emu: Emulator, emulator_pki: EmulatorPki, sdk_clients: Callable[[Any], Any]
) -> None:
    emu.add_individual_enrollment("reg1", symmetric_key=new_symmetric_key())
    with pytest.raises(CredentialError):
        dps_sas_client("reg1", new_symmetric_key(), emulator_pki, sdk_clients).register()
    assert emu.received.refused_connects("reg1")[0].service == "dps"


def test_dps_token_with_skn_registration_is_accepted(emu: Emulator, raw: Any) -> None:
    key = new_symmetric_key()
    emu.add_individual_enrollment("reg1", symmetric_key=key)
    token = make_sas_token(key, f"{ID_SCOPE}/registrations/reg1", int(time.time()) + 60,
                           "registration")  # fmt: skip
    username = f"{ID_SCOPE}/registrations/reg1/api-version=2019-03-31"
    assert raw().connect("reg1", username, token) == 0


def test_dps_registration_id_in_body_must_match_the_connection(emu: Emulator, raw: Any) -> None:
    key = new_symmetric_key()
    emu.add_individual_enrollment("reg1", symmetric_key=key)
    token = make_sas_token(key, f"{ID_SCOPE}/registrations/reg1", int(time.time()) + 60)
    client = raw()
    assert client.connect("reg1", f"{ID_SCOPE}/registrations/reg1/api-version=2019-03-31",
                          token) == 0  # fmt: skip
    client.send(mqtt.encode_subscribe(mqtt.Subscribe(1, (("$dps/registrations/res/#", 1),))))
    client.read()
    body = json.dumps({"registrationId": "reg2", "payload": None}).encode()
    topic = "$dps/registrations/PUT/iotdps-register/?$rid=1"
    client.send(mqtt.encode_publish(mqtt.Publish(topic, body)))
    packet = client.read()
    assert packet is not None and b"$dps/registrations/res/401/" in packet[1]


@pytest.mark.timeout(25)
def test_dps_registered_device_connects_to_its_assigned_hub(
    emu: Emulator, emulator_pki: EmulatorPki, sdk_clients: Callable[[Any], Any]
) -> None:
    group_key = new_symmetric_key()
    emu.add_group_enrollment("fleet", symmetric_key=group_key)
    device_key = derive_group_key(group_key, "unit-7")
    state = dps_sas_client("unit-7", device_key, emulator_pki, sdk_clients).register()
    state = state.registration_state

    client = sdk_clients(IoTHubDeviceClient.create_from_symmetric_key(
        symmetric_key=device_key, hostname=state.assigned_hub, device_id=state.device_id,
        server_verification_cert=emulator_pki.ca_pem))  # fmt: skip
    client.connect()
    client.send_message("first")
    assert emu.received.telemetry[0].device_id == "unit-7"


# --- gateway and standalone configuration ----------------------------------------------------


def test_gateway_connection_names_the_hub_while_tls_goes_to_the_gateway(
    make_emulator: Callable[..., Emulator],
    emulator_pki: EmulatorPki,
    sdk_clients: Callable[[Any], Any],
) -> None:
    emu = make_emulator(HOST, hub_hostname="emuhub.azure-devices.net")
    key = new_symmetric_key()
    emu.add_device("edge1", symmetric_key=new_symmetric_key())
    emu.add_module("edge1", "spyrus_hsm", symmetric_key=key)
    client = sdk_clients(IoTHubModuleClient.create_from_connection_string(
        f"HostName=emuhub.azure-devices.net;DeviceId=edge1;ModuleId=spyrus_hsm;"
        f"SharedAccessKey={key};GatewayHostName={HOST}",
        server_verification_cert=emulator_pki.ca_pem))  # fmt: skip
    client.connect()
    [accepted] = emu.received.accepted_connects("edge1/spyrus_hsm")
    assert accepted.username.startswith("emuhub.azure-devices.net/edge1/spyrus_hsm/?")


def test_yaml_config_registers_devices_modules_and_enrollments(
    tmp_path: Path, emulator_pki: EmulatorPki
) -> None:
    key = new_symmetric_key()
    (tmp_path / "demo.key").write_text(key + "\n")
    (tmp_path / "fleet-ca.pem").write_text(emulator_pki.root.cert_pem)
    (tmp_path / "emulator.yaml").write_text(
        "devices:\n"
        "  - {id: demo, symmetric_key_file: demo.key,"
        f" modules: [{{id: mod, symmetric_key: '{key}'}}]}}\n"
        "enrollments:\n"
        f"  - {{registration_id: reg1, symmetric_key: '{key}', device_id: dev-reg1}}\n"
        "  - {group: fleet, x509_ca: fleet-ca.pem}\n"
    )
    config = load_config(tmp_path / "emulator.yaml")
    emu = build_emulator(config, HOST)
    assert emu.is_registered("demo") and emu.is_registered("demo", "mod")
    assert (tmp_path / "emulator-pki" / "root-ca.pem").exists()


def test_yaml_config_error_names_the_file_and_the_key(tmp_path: Path) -> None:
    path = tmp_path / "emulator.yaml"
    path.write_text("devices:\n  - {id: d1, symmetric_key: k, colour: red}\n")
    with pytest.raises(ConfigError, match=r"emulator\.yaml: devices\[0\]: unknown keys \['colour'\]"):
        load_config(path)
