"""The IoT Edge deployment: `iotedgedev genconfig` turns deployment.template.json and
modules/spyrus_hsm/module.json into manifests that Azure accepts (schema, twin value sizes),
with the HSM's USB bus passed through the way the pitfalls require and nothing left to fill in.
deployment.pcsc-host.template.json (the host's pcscd socket bound in instead of the USB bus) is
held to the same checks. The configuration file of docs/deployment/production.md must be one the
module accepts and agree with what each manifest binds and sets (no SPYRUS_HSM_PKCS11_MODULE to
override the file's hsm.module; the PIN file, state volume and PC/SC mode where the page puts them).

deployments/layered.spyrus-hsm.json, the fleet's layered deployment, is checked offline too: set
leaf by leaf onto the generated base manifest it must still validate, its module must be the
base template's, and the module must accept its twin settings.

iotedgedev lives in its own virtualenv (.build/iotedgedev, `make tools`); genconfig runs with
every proxy pointing at a closed loopback port and DOCKER_HOST at a listener that must see no
connection, so nothing leaves the machine and Docker is never needed.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from spyrus_hsm import config
from spyrus_hsm.config import ServiceConfig
from spyrus_hsm.edge import reported, twin
from spyrus_hsm.hsm import HsmState

ROOT = Path(__file__).resolve().parents[2]
IOTEDGEDEV = ROOT / ".build" / "iotedgedev" / "bin" / "iotedgedev"
SCHEMA = Path(__file__).parent / "schemas" / "azure-iot-edge-deployment-2.0.json"
CLOSED_PORT = "http://127.0.0.1:9"
REGISTRY = "localhost:5000"
TWIN_VALUE_MAX = 512      # characters in one twin value
CREATE_OPTIONS_MAX_CHUNKS = 8
PLATFORMS = ("amd64", "arm64v8")
TEMPLATES = {"usb": "deployment.template.json", "pcsc-host": "deployment.pcsc-host.template.json"}


@dataclass
class Generated:
    platform: str
    template: str
    text: str
    output: str
    docker_contacted: bool

    @property
    def manifest(self) -> dict[str, Any]:
        return dict(json.loads(self.text))

    @property
    def agent(self) -> dict[str, Any]:
        return dict(self.manifest["modulesContent"]["$edgeAgent"]["properties.desired"])

    @property
    def module(self) -> dict[str, Any]:
        return dict(self.agent["modules"]["spyrus_hsm"])

    def create_option_chunks(self, settings: dict[str, Any]) -> list[str]:
        keys = ["createOptions"] + [f"createOptions{i:02d}" for i in range(1, CREATE_OPTIONS_MAX_CHUNKS)]
        return [settings[k] for k in keys if k in settings]

    @property
    def create_options(self) -> dict[str, Any]:
        return dict(json.loads("".join(self.create_option_chunks(self.module["settings"]))))


def _iotedgedev() -> Path:
    if IOTEDGEDEV.exists():
        return IOTEDGEDEV
    message = f"{IOTEDGEDEV} is missing: run 'make tools' (make test builds it)"
    if os.environ.get("SPYRUS_TOOLS_REQUIRED") == "1":
        pytest.fail(message)
    pytest.skip(message)


def env_template_value(name: str) -> str:
    """The value `.env.template` gives `name` (what a developer's .env starts from)."""
    for line in (ROOT / ".env.template").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == name:
            return value.strip().strip('"')
    raise AssertionError(f".env.template does not set {name}")


def genconfig(tmp: Path, platform: str, template: str = TEMPLATES["usb"], **extra_env: str) -> Generated:
    home = tmp / "home"
    (home / ".iotedgedev").mkdir(parents=True)
    # Past iotedgedev's first-run notice, with its usage telemetry off.
    (home / ".iotedgedev" / "setting.ini").write_text("[DEFAULT]\nfirsttime = no\ncollect_telemetry = no\n")
    out_dir = tmp / "config"
    with socket.socket() as docker:
        docker.bind(("127.0.0.1", 0))
        docker.listen(8)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "LANG": "C.UTF-8",
            **{var: CLOSED_PORT for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")},
            "DOCKER_HOST": f"tcp://127.0.0.1:{docker.getsockname()[1]}",
            "CONTAINER_REGISTRY_SERVER": REGISTRY,
            "CONTAINER_REGISTRY_USERNAME": "edge-test",
            "CONTAINER_REGISTRY_PASSWORD": "not-a-real-password",
            "CONFIG_OUTPUT_DIR": str(out_dir),
            "EDGE_RUNTIME_VERSION": env_template_value("EDGE_RUNTIME_VERSION"),
            **extra_env,
        }
        # cwd is the empty temporary directory, so a developer's own .env does not count.
        proc = subprocess.run(
            [str(_iotedgedev()), "solution", "genconfig", "-f", str(ROOT / template),
             "-P", platform],
            cwd=tmp, env=env, capture_output=True, text=True, timeout=120, check=False)
        docker.setblocking(False)
        try:
            docker.accept()[0].close()
            contacted = True
        except BlockingIOError:
            contacted = False
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    name = template.removesuffix(".template.json")
    return Generated(platform, template, (out_dir / f"{name}.{platform}.json").read_text(), output, contacted)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[tuple[str, str], Generated]]:
    yield {(t, p): genconfig(tmp_path_factory.mktemp(f"{t}-{p}"), p, TEMPLATES[t]) for t in TEMPLATES
           for p in PLATFORMS}


@pytest.fixture(params=[(t, p) for t in TEMPLATES for p in PLATFORMS], ids=lambda tp: "-".join(tp))
def gen(request: pytest.FixtureRequest, generated: dict[tuple[str, str], Generated]) -> Generated:
    return generated[request.param]


def project_version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def test_the_manifest_validates_against_the_deployment_schema(gen: Generated) -> None:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(gen.manifest)]
    assert not errors, errors


def test_every_create_options_chunk_fits_in_a_twin_value(gen: Generated) -> None:
    sizes = {}
    for name, mod in [*gen.agent["systemModules"].items(), *gen.agent["modules"].items()]:
        chunks = gen.create_option_chunks(mod["settings"])
        assert chunks and len(chunks) <= CREATE_OPTIONS_MAX_CHUNKS, name
        assert all(isinstance(c, str) and len(c) <= TWIN_VALUE_MAX for c in chunks), (name, list(map(len, chunks)))
        json.loads("".join(chunks))
        sizes[name] = [len(c) for c in chunks]
    print(f"{gen.platform} createOptions chunk sizes: {sizes}")


def test_no_placeholder_is_left(gen: Generated) -> None:
    assert not re.findall(r"\$\{[^}]*\}", gen.text)
    assert not re.findall(r"\$[A-Z][A-Z0-9_]+", gen.text.replace("$upstream", "")), "unexpanded $VAR"


def test_the_image_is_the_modules_platform_tag_in_the_registry(gen: Generated) -> None:
    assert gen.module["settings"]["image"] == f"{REGISTRY}/spyrus-hsm:{project_version()}-{gen.platform}"
    registry = gen.agent["runtime"]["settings"]["registryCredentials"]["registry"]
    assert registry["address"] == REGISTRY


def test_the_usb_bus_is_bound_with_a_cgroup_rule_and_the_module_is_not_privileged(gen: Generated) -> None:
    if gen.template != TEMPLATES["usb"]:
        pytest.skip("the pcsc-host variant binds the host's pcscd socket instead")
    host = gen.create_options["HostConfig"]
    assert "/dev/bus/usb:/dev/bus/usb" in host["Binds"]
    assert host["DeviceCgroupRules"] == ["c 189:* rmw"]
    assert "Privileged" not in json.dumps(gen.create_options)
    assert "Devices" not in host, "fixed --device paths break on replug (moby #46608)"


def test_secrets_config_and_state_are_mounted_where_the_module_looks(gen: Generated) -> None:
    binds = gen.create_options["HostConfig"]["Binds"]
    env = {k: v["value"] for k, v in gen.module["env"].items()}
    pin_binds = [b for b in binds if b.split(":")[1] == env["SPYRUS_HSM_PIN_FILE"]]
    assert len(pin_binds) == 1 and pin_binds[0].endswith(":ro")
    assert f"/etc/spyrus-hsm:{Path(env['SPYRUS_HSM_CONFIG']).parent}:ro" in binds
    state = [b for b in binds if b.split(":")[1] == "/var/lib/spyrus-hsm"]
    assert len(state) == 1 and not state[0].startswith("/"), "the state is a named volume"
    assert "SPYRUS_HSM_PKCS11_MODULE" not in env, "it would override hsm.module, the one place the library is named"
    assert env["OTEL_SERVICE_NAME"] == "spyrus-hsm"


def production_config() -> tuple[str, dict[str, Any]]:
    """The configuration file of docs/deployment/production.md: its text and the YAML."""
    page = (ROOT / "docs" / "deployment" / "production.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", page, re.S)
    assert len(blocks) == 1, "the production page has one configuration file"
    return blocks[0], dict(yaml.safe_load(blocks[0]))


def test_the_production_config_is_valid_and_matches_what_the_manifest_binds_and_sets(
        gen: Generated, tmp_path: Path) -> None:
    text, doc = production_config()
    # The page's placeholders, filled in as an operator would; then the module must accept it.
    filled = re.sub(r"<sha256 hex[^>]*>", "ab" * 32, text)
    (tmp_path / "config.yaml").write_text(filled)
    cfg = config.load(str(tmp_path / "config.yaml"), env={})
    env = {k: v["value"] for k, v in gen.module["env"].items()}
    binds = {b.split(":")[0]: b.split(":")[1] for b in gen.create_options["HostConfig"]["Binds"]}
    mounted = list(binds.values())
    h = cfg.hsm
    # the file is where the library is named, inside a folder the manifest binds
    assert "SPYRUS_HSM_PKCS11_MODULE" not in env and doc["hsm"]["module"].startswith("/opt/vendor-pkcs11/")
    assert any(h.module.startswith(m + "/") for m in mounted), h.module
    assert h.token_label and h.token_serial and h.serial is True  # both selectors; one operation at a time
    assert h.pin_file == env["SPYRUS_HSM_PIN_FILE"] == binds["/etc/spyrus-hsm/pin"]
    assert env["SPYRUS_HSM_CONFIG"] == "/etc/spyrus-hsm/config.yaml"
    if gen.template == TEMPLATES["usb"]:  # the recommended mode is the base template's
        assert h.pcscd == env["SPYRUS_HSM_PCSCD"] == "internal"
    assert cfg.state_dir == binds["spyrus-hsm-state"]
    s = cfg.service
    assert s.tls_key_label and not s.tls_key_file and not s.tls_cert_file  # the issued placement
    assert s.client_ca_file and any(s.client_ca_file.startswith(m + "/") for m in mounted)
    assert s.bearer_tokens and s.signing_keys == () and s.policy
    assert all(rule.devices == ("{cn}",) for rule in s.policy)


def test_the_api_port_is_published(gen: Generated) -> None:
    assert gen.create_options["HostConfig"]["PortBindings"] == {"8443/tcp": [{"HostPort": "8443"}]}


def test_the_runtime_is_iot_edge_1_6_by_default(gen: Generated) -> None:
    assert env_template_value("EDGE_RUNTIME_VERSION") == "1.6", "1.6 is the current LTS (1.5 left service 2026-11-10)"
    assert gen.agent["schemaVersion"] == "1.1"
    assert gen.agent["runtime"]["type"] == "docker"
    images = {n: m["settings"]["image"] for n, m in gen.agent["systemModules"].items()}
    assert images == {"edgeAgent": "mcr.microsoft.com/azureiotedge-agent:1.6",
                      "edgeHub": "mcr.microsoft.com/azureiotedge-hub:1.6"}


def test_the_runtime_images_follow_edge_runtime_version(tmp_path: Path) -> None:
    gen = genconfig(tmp_path, "amd64", EDGE_RUNTIME_VERSION="1.6.3")
    images = {n: m["settings"]["image"] for n, m in gen.agent["systemModules"].items()}
    assert images == {"edgeAgent": "mcr.microsoft.com/azureiotedge-agent:1.6.3",
                      "edgeHub": "mcr.microsoft.com/azureiotedge-hub:1.6.3"}


def test_no_deployment_file_names_a_runtime_out_of_service() -> None:
    """The runtime version is set in one place (.env.template); nothing pins 1.4 or 1.5."""
    files = [ROOT / ".env.template", *ROOT.glob("deployment*.template.json"), *(ROOT / "deployments").glob("*.json")]
    stale = re.compile(r"azureiotedge-(?:agent|hub):1\.[45]\b|EDGE_RUNTIME_VERSION=1\.[45]\b")
    found = [f"{f.name}: {m.group(0)}" for f in files for m in stale.finditer(f.read_text())]
    assert not found, found


def test_the_log_driver_caps_the_modules_log_files(gen: Generated) -> None:
    log_config = gen.create_options["HostConfig"]["LogConfig"]
    assert log_config["Type"] == "json-file"
    assert log_config["Config"]["max-size"].endswith("m") and int(log_config["Config"]["max-file"]) >= 2


def test_the_metrics_port_is_exposed_on_the_module_network_only(gen: Generated) -> None:
    assert "9600/tcp" in gen.create_options["ExposedPorts"]
    assert "9600/tcp" not in gen.create_options["HostConfig"]["PortBindings"]


def test_module_outputs_route_upstream_and_twin_defaults_are_set(gen: Generated) -> None:
    content = gen.manifest["modulesContent"]
    hub = content["$edgeHub"]["properties.desired"]
    assert "FROM /messages/modules/spyrus_hsm/outputs/* INTO $upstream" in hub["routes"].values()
    assert hub["storeAndForwardConfiguration"]["timeToLiveSecs"] > 0
    assert content["spyrus_hsm"]["properties.desired"] == {
        "logLevel": "info",
        "service": {"rateLimitPerSecond": 20, "rateLimitBurst": 40, "cacheReuseFraction": 0.5,
                    "maxTtlSeconds": 86400, "auditFailClosed": True},
    }


def test_genconfig_never_contacts_docker(gen: Generated) -> None:
    assert not gen.docker_contacted


def test_module_json_builds_from_the_repository_root_with_the_root_dockerfiles() -> None:
    module_dir = ROOT / "modules" / "spyrus_hsm"
    image = json.loads((module_dir / "module.json").read_text())["image"]
    # iotedgedev resolves both relative to the module folder.
    assert (module_dir / image["contextPath"]).resolve() == ROOT
    for platform in PLATFORMS:
        assert (module_dir / image["tag"]["platforms"][platform]).resolve() == ROOT / f"Dockerfile.{platform}"
    assert image["tag"]["version"] == project_version()


def test_the_two_dockerfiles_differ_only_in_their_base_image() -> None:
    def normalised(platform: str) -> list[str]:
        lines = (ROOT / f"Dockerfile.{platform}").read_text().splitlines()
        return [ln for ln in lines if not ln.startswith(("ARG BASE_IMAGE=", "#"))]

    assert normalised("amd64") == normalised("arm64v8")
    assert "ARG BASE_IMAGE=arm64v8/debian:bookworm-slim" in (ROOT / "Dockerfile.arm64v8").read_text()


def test_the_pcsc_host_variant_binds_the_hosts_pcscd_folder_and_no_usb(
        generated: dict[tuple[str, str], Generated]) -> None:
    for platform in PLATFORMS:
        gen = generated[("pcsc-host", platform)]
        host = gen.create_options["HostConfig"]
        # The folder, not the socket file: a restarted host pcscd makes a new socket in it.
        assert "/run/pcscd:/run/pcscd" in host["Binds"]
        assert not any(b.startswith("/dev/bus/usb") for b in host["Binds"]) and "DeviceCgroupRules" not in host
        assert "Privileged" not in json.dumps(gen.create_options)
        assert gen.module["env"]["SPYRUS_HSM_PCSCD"] == {"value": "host"}
        base = generated[("usb", platform)]
        assert base.module["env"]["SPYRUS_HSM_PCSCD"] == {"value": "internal"}  # pcscd in the module: the USB bind


# --- the layered deployment for the fleet (deployments/layered.spyrus-hsm.json) ---------------

LAYERED = ROOT / "deployments" / "layered.spyrus-hsm.json"
LAYER_PREFIX = "properties.desired."


@pytest.fixture(scope="module")
def layered() -> dict[str, Any]:
    """The layered deployment as `az iot edge deployment create` gets it, after the envsubst of
    the two variables it names (docs/deployment/iot-edge.md, fleet roll-out)."""
    text = LAYERED.read_text()
    text = text.replace("${CONTAINER_REGISTRY_SERVER}", REGISTRY)
    assert not re.findall(r"\$\{[^}]*\}", text), "a placeholder the documented envsubst does not substitute"
    return dict(json.loads(text))


def set_path(document: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        document = document.setdefault(part, {})
    document[leaf] = value


def applied(base: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """`base` with the layer's `properties.desired.<path>` entries set where IoT Hub merges them."""
    merged = json.loads(json.dumps(base))
    for module, entries in layer["content"]["modulesContent"].items():
        for key, value in entries.items():
            assert key.startswith(LAYER_PREFIX), (module, key)
            set_path(merged["modulesContent"].setdefault(module, {}).setdefault("properties.desired", {}),
                     key[len(LAYER_PREFIX):], value)
    return merged


def test_the_layer_targets_the_rosetta_fleet_above_the_base_deployment(layered: dict[str, Any]) -> None:
    assert layered["targetCondition"] == "tags.hsm='spyrus-rosetta'"
    assert isinstance(layered["priority"], int) and layered["priority"] > 0


def test_the_layer_on_the_base_manifest_validates_against_the_deployment_schema(
        layered: dict[str, Any], generated: dict[tuple[str, str], Generated]) -> None:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    merged = applied(generated[("usb", "amd64")].manifest, layered)
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(merged)]
    assert not errors, errors


def test_the_layers_module_is_the_base_templates_module(layered: dict[str, Any],
                                                        generated: dict[tuple[str, str], Generated]) -> None:
    base = generated[("usb", "amd64")]
    module = layered["content"]["modulesContent"]["$edgeAgent"]["properties.desired.modules.spyrus_hsm"]
    chunks = base.create_option_chunks(module["settings"])
    assert all(isinstance(c, str) and len(c) <= TWIN_VALUE_MAX for c in chunks)
    assert json.loads("".join(chunks)) == base.create_options
    assert module["env"] == base.module["env"]
    assert module["settings"]["image"] == f"{REGISTRY}/spyrus-hsm:{project_version()}-amd64"
    assert {k: v for k, v in module.items() if k not in ("env", "settings")} == {
        k: v for k, v in base.module.items() if k not in ("env", "settings")}


def test_twin_settings_are_set_leaf_by_leaf_and_the_module_accepts_them(layered: dict[str, Any]) -> None:
    entries = layered["content"]["modulesContent"]["spyrus_hsm"]
    desired: dict[str, Any] = {}
    for key, value in entries.items():
        assert not isinstance(value, dict), f"{key} would replace what other layers set below it"
        set_path(desired, key[len(LAYER_PREFIX):], value)
    assert set(desired) <= set(twin.TOP_LEVEL) and desired["service"]
    assert all(k.startswith(LAYER_PREFIX + "service.") for k in entries if k != LAYER_PREFIX + "logLevel")
    evaluated = twin.evaluate(desired, ServiceConfig(enabled=True, tls_cert_file="c", tls_key_file="k"), 1)
    assert evaluated.service.rate_limit_burst == desired["service"]["rateLimitBurst"]
    hub = layered["content"]["modulesContent"]["$edgeHub"]
    assert "FROM /messages/modules/spyrus_hsm/outputs/events INTO $upstream" in hub.values()


def test_the_custom_metrics_query_properties_the_module_reports(layered: dict[str, Any]) -> None:
    queries = layered["metrics"]["queries"]
    assert set(queries) == {"hsmNotReady", "certificateExpiresWithin14Days"}
    for query in queries.values():
        assert query.startswith("SELECT deviceId FROM devices.modules WHERE moduleId = 'spyrus_hsm' AND ")
    assert queries["hsmNotReady"].endswith("properties.reported.hsm.ready = false")
    assert queries["certificateExpiresWithin14Days"].endswith("properties.reported.credentials.earliestDaysLeft < 14")
    # ... and those are the names the module reports under
    assert "ready" in reported.hsm_section(HsmState("degraded"))
    assert "earliestDaysLeft" in reported.credentials_section([])
