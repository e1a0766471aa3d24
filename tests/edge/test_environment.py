"""IoT Edge detection: the edge runtime's variables, the connection-string fallback the SDK
also takes, and clear errors (never showing the key) for a half-configured environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from spyrus_hsm.edge.environment import IOTEDGE_VARS, EdgeEnvironmentError, detect

KEY = "c2VjcmV0LW1vZHVsZS1rZXktdmFsdWU9PQ=="


def connection_string(**fields: str) -> str:
    values = {"HostName": "hub.azure-devices.net", "DeviceId": "edge1", "ModuleId": "spyrus_hsm",
              "GatewayHostName": "edgehub", "SharedAccessKey": KEY, **fields}
    return ";".join(f"{k}={v}" for k, v in values.items() if v)


@pytest.fixture
def ca_file(tmp_path: Path) -> str:
    path = tmp_path / "edge-ca.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\n")
    return str(path)


def test_not_under_iot_edge() -> None:
    assert detect({"HOME": "/root"}) is None


def test_the_edge_runtime_variables() -> None:
    env = {name: f"v-{name.lower()}" for name in IOTEDGE_VARS}
    env |= {"IOTEDGE_DEVICEID": "edge1", "IOTEDGE_MODULEID": "spyrus_hsm"}
    found = detect(env)
    assert found is not None and found.kind == "iotedge"
    assert (found.device_id, found.module_id) == ("edge1", "spyrus_hsm")


def test_the_connection_string_fallback(ca_file: str) -> None:
    found = detect({"EdgeHubConnectionString": connection_string(), "EdgeModuleCACertificateFile": ca_file})
    assert found is not None and found.kind == "connection-string"
    assert (found.hub_hostname, found.device_id, found.module_id, found.gateway_hostname, found.ca_file) == (
        "hub.azure-devices.net", "edge1", "spyrus_hsm", "edgehub", ca_file)
    assert KEY not in repr(found) and KEY not in found.describe()


def test_incomplete_edge_runtime_variables_name_the_missing_ones() -> None:
    with pytest.raises(EdgeEnvironmentError, match="IOTEDGE_WORKLOADURI, IOTEDGE_APIVERSION missing"):
        detect({name: "x" for name in IOTEDGE_VARS[:5]})


def test_a_connection_string_without_its_ca_file_is_an_error() -> None:
    with pytest.raises(EdgeEnvironmentError, match="EdgeModuleCACertificateFile is not set") as info:
        detect({"EdgeHubConnectionString": connection_string()})
    assert KEY not in str(info.value)


def test_a_connection_string_missing_a_field_names_the_field_not_the_key(ca_file: str) -> None:
    with pytest.raises(EdgeEnvironmentError, match="lacks GatewayHostName") as info:
        detect({"EdgeHubConnectionString": connection_string(GatewayHostName=""),
                "EdgeModuleCACertificateFile": ca_file})
    assert KEY not in str(info.value)


def test_an_unreadable_ca_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(EdgeEnvironmentError, match="not a readable file"):
        detect({"EdgeHubConnectionString": connection_string(),
                "EdgeModuleCACertificateFile": str(tmp_path / "missing.pem")})
