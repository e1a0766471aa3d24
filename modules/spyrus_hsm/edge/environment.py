"""Detects whether the process runs as an IoT Edge module and how it reaches edgeHub.

The SDK's `IoTHubModuleClient.create_from_edge_environment()` looks for the seven `IOTEDGE_*`
variables the edge runtime sets (identity through the workload API) and otherwise falls back to
`EdgeHubConnectionString` + `EdgeModuleCACertificateFile` (the local-development route, with
the module key in the connection string). This module checks the same variables first, so a
half-configured environment fails with a message naming what is missing instead of the SDK's
"Invalid Connection String". Nothing here keeps the module key: only names leave this module.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from ..config import ConfigError

IOTEDGE_VARS = (
    "IOTEDGE_IOTHUBHOSTNAME", "IOTEDGE_DEVICEID", "IOTEDGE_MODULEID", "IOTEDGE_GATEWAYHOSTNAME",
    "IOTEDGE_MODULEGENERATIONID", "IOTEDGE_WORKLOADURI", "IOTEDGE_APIVERSION",
)
CONNECTION_STRING_VAR = "EdgeHubConnectionString"
CA_FILE_VAR = "EdgeModuleCACertificateFile"
_CONNECTION_STRING_KEYS = ("HostName", "DeviceId", "ModuleId", "GatewayHostName", "SharedAccessKey")


class EdgeEnvironmentError(ConfigError):
    """The IoT Edge variables are present but incomplete or unusable; says which and why."""


@dataclass(frozen=True)
class EdgeEnvironment:
    kind: Literal["iotedge", "connection-string"]
    hub_hostname: str
    device_id: str
    module_id: str
    gateway_hostname: str
    ca_file: str | None = None  # connection-string route: edgeHub's CA certificate

    def describe(self) -> str:
        how = "IoT Edge workload API" if self.kind == "iotedge" else f"{CONNECTION_STRING_VAR}"
        return (f"module {self.device_id}/{self.module_id} of hub {self.hub_hostname} "
                f"via edgeHub {self.gateway_hostname} ({how})")


def detect(env: Mapping[str, str]) -> EdgeEnvironment | None:
    """The edge environment in `env`, None when not running under IoT Edge at all."""
    edge = {name: env.get(name, "") for name in IOTEDGE_VARS}
    if all(edge.values()):
        return EdgeEnvironment("iotedge", edge["IOTEDGE_IOTHUBHOSTNAME"], edge["IOTEDGE_DEVICEID"],
                               edge["IOTEDGE_MODULEID"], edge["IOTEDGE_GATEWAYHOSTNAME"])
    connection_string, ca_file = env.get(CONNECTION_STRING_VAR, ""), env.get(CA_FILE_VAR, "")
    if connection_string or ca_file:
        return _from_connection_string(connection_string, ca_file)
    present = [name for name, value in edge.items() if value]
    if present:
        missing = [name for name, value in edge.items() if not value]
        raise EdgeEnvironmentError(
            f"IoT Edge environment incomplete: {', '.join(present)} set but {', '.join(missing)} "
            "missing; the edge runtime sets all of them (or, for local development, set "
            f"{CONNECTION_STRING_VAR} and {CA_FILE_VAR})")
    return None


def _from_connection_string(connection_string: str, ca_file: str) -> EdgeEnvironment:
    if not connection_string or not ca_file:
        missing = CA_FILE_VAR if connection_string else CONNECTION_STRING_VAR
        raise EdgeEnvironmentError(f"{missing} is not set: the edgeHub connection-string route needs "
                                   f"both {CONNECTION_STRING_VAR} and {CA_FILE_VAR}")
    fields = parse_connection_string(connection_string)
    missing_keys = [k for k in _CONNECTION_STRING_KEYS if not fields.get(k)]
    if missing_keys:
        raise EdgeEnvironmentError(f"{CONNECTION_STRING_VAR} lacks {', '.join(missing_keys)}; it must "
                                   "name HostName, DeviceId, ModuleId, GatewayHostName and SharedAccessKey")
    if not os.path.isfile(ca_file) or not os.access(ca_file, os.R_OK):
        raise EdgeEnvironmentError(f"{CA_FILE_VAR} names {ca_file}, which is not a readable file "
                                   "(edgeHub's CA certificate, PEM)")
    return EdgeEnvironment("connection-string", fields["HostName"], fields["DeviceId"], fields["ModuleId"],
                           fields["GatewayHostName"], ca_file)


def parse_connection_string(text: str) -> dict[str, str]:
    """`Key=Value;...` (values may contain '=', as base64 keys do). Never put the result in a
    message: it holds the SharedAccessKey."""
    fields = {}
    for part in text.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key:
            fields[key] = value
    return fields
