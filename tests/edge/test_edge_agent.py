"""The module under IoT Edge (in-process `Module.run`, real SDK, emulator as edgeHub, the
session's SoftHSM token): twin configuration applied live, reported state, direct methods."""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
import secrets
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import NoEncryption, pkcs12
from edge_harness import GATEWAY, EdgeSite, ModuleSite

from emulator import new_symmetric_key
from emulator.pki import make_ca, make_device_cert
from spyrus_hsm import __version__
from spyrus_hsm.config import Config, ServiceConfig
from spyrus_hsm.edge.agent import EdgeAgent, EdgeHooks
from spyrus_hsm.edge.environment import detect
from spyrus_hsm.hsm import Hsm, Secret

pytestmark = [pytest.mark.timeout(90)]

GW_CAN_MINT = [{"principals": ["gw"], "operations": ["sas-token"], "devices": ["leaf-*"]}]
CERT_EXPIRY = dt.datetime(2033, 3, 4, 5, 6, 7, tzinfo=dt.UTC)


@pytest.fixture
def leaf(hsm: Hsm) -> tuple[str, bytes]:
    """A leaf device's SAS primary key in the HSM (label = device id)."""
    device, key = "leaf-" + secrets.token_hex(3), secrets.token_bytes(32)
    hsm.import_secret_key(device, Secret(key))
    return device, key


@pytest.fixture
def x509_label(hsm: Hsm) -> str:
    """An X.509 credential (key + certificate + CA) in the HSM, expiring at CERT_EXPIRY."""
    label = "edge-id-" + secrets.token_hex(3)
    ca = make_ca("Edge Credential CA")
    leaf = make_device_cert(ca, label, not_after=CERT_EXPIRY)
    assert isinstance(leaf.key, ec.EllipticCurvePrivateKey)
    hsm.import_pkcs12(label, pkcs12.serialize_key_and_certificates(None, leaf.key, leaf.cert, [ca.cert],
                                                                   NoEncryption()), None)
    return label


def connected(site: EdgeSite) -> dict[str, Any]:
    """Reported properties once the module has connected, read the twin and seen the HSM."""
    return site.wait_reported(lambda r: (r.get("config") and (r.get("hsm") or {}).get("ready")
                                         and r.get("credentials")))


def mint(ms: ModuleSite, device: str) -> tuple[int, Any]:
    return ms.call("POST", "/v1/sas-tokens", {"deviceId": device})


# --- reported properties ------------------------------------------------------------------------


def test_reports_version_hsm_state_and_the_credential_inventory(
        site: EdgeSite, module_site: Callable[..., ModuleSite], token_env: Any,
        leaf: tuple[str, bytes], x509_label: str) -> None:
    module_site(policy=GW_CAN_MINT).start()
    reported = connected(site)
    assert reported["version"] == __version__
    hsm = reported["hsm"]
    assert (hsm["status"], hsm["ready"], hsm["tokenLabel"]) == ("ready", True, token_env.label)
    assert hsm["tokenSerial"] and hsm.get("reason") is None
    assert reported["config"]["status"] == "applied" and reported["config"]["desiredVersion"] == 1
    items = {i["label"]: i for i in reported["credentials"]["items"]}
    assert items[leaf[0]]["kind"] == "secret-key"
    cred = items[x509_label]
    assert (cred["kind"], cred["commonName"], cred["notAfter"]) == ("x509", x509_label, "2033-03-04T05:06:07Z")
    assert cred["objects"] == ["cert", "private", "public"] and cred["chainLength"] == 2


def test_the_reported_renewal_point_follows_the_configured_fraction(
        site: EdgeSite, module_site: Callable[..., ModuleSite], hsm: Hsm, x509_label: str) -> None:
    ms = module_site(policy=GW_CAN_MINT)
    ms.document["cloud"] = {"renew_at": 0.5}
    ms.write_config()
    ms.start()
    reported = connected(site)
    cred = {i["label"]: i for i in reported["credentials"]["items"]}[x509_label]
    leaf = hsm.certificate_chain(x509_label)[0]
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    assert cred["renewAt"] == (start + (end - start) / 2).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert reported["credentials"]["earliestNotAfter"] <= cred["notAfter"]


def test_reported_properties_hold_no_secret(site: EdgeSite, module_site: Callable[..., ModuleSite],
                                            token_env: Any, leaf: tuple[str, bytes]) -> None:
    ms = module_site(policy=GW_CAN_MINT)
    ms.start()
    connected(site)
    text = json.dumps(site.emu.twin("edge1", "spyrus_hsm")) + repr(site.emu.received.reported_patches)
    for secret in (site.module_key, token_env.pin.decode(), base64.b64encode(leaf[1]).decode(),
                   leaf[1].hex(), ms.bearer):
        assert secret not in text


# --- desired properties -------------------------------------------------------------------------


def test_a_desired_patch_is_applied_live_and_reported(site: EdgeSite, module_site: Callable[..., ModuleSite],
                                                      leaf: tuple[str, bytes]) -> None:
    ms = module_site(policy=GW_CAN_MINT)
    module = ms.start()
    connected(site)
    assert mint(ms, leaf[0])[0] == 200 and mint(ms, leaf[0])[0] == 200

    version = site.patch({"service": {"rateLimitPerSecond": 0.001, "rateLimitBurst": 1}})
    config = site.wait_config(version)

    assert config == {"status": "applied", "desiredVersion": version, "appliedVersion": version,
                      "source": "twin"}
    assert module.service is not None
    assert (module.service.cfg.rate_limit_per_second, module.service.cfg.rate_limit_burst) == (0.001, 1)
    assert mint(ms, leaf[0])[0] == 200
    status, problem = mint(ms, leaf[0])
    assert status == 429, problem


def test_a_new_policy_takes_effect_without_a_restart(site: EdgeSite, module_site: Callable[..., ModuleSite],
                                                     leaf: tuple[str, bytes]) -> None:
    ms = module_site(policy=GW_CAN_MINT)  # the file's policy: the ceiling of the twin's
    module = ms.start()
    connected(site)
    version = site.patch({"service": {"policy": []}})  # default deny
    assert site.wait_config(version)["status"] == "applied"
    assert mint(ms, leaf[0])[0] == 403

    version = site.patch({"service": {"policy": GW_CAN_MINT}})
    assert site.wait_config(version)["status"] == "applied"

    assert module.service is not None and module.service.policy.rules[0].principals == ("gw",)
    status, body = mint(ms, leaf[0])
    assert status == 200 and body["resourceUri"] == f"hub.example/devices/{leaf[0]}"


def test_the_twin_cannot_widen_the_files_policy(site: EdgeSite, module_site: Callable[..., ModuleSite],
                                                leaf: tuple[str, bytes]) -> None:
    ms = module_site(policy=GW_CAN_MINT)  # sas-token for leaf-* only
    ms.start()
    connected(site)
    everything = [{"principals": ["*"], "operations": ["*"], "devices": ["*"], "keys": ["*"]}]
    version = site.patch({"service": {"policy": everything}})
    assert site.wait_config(version)["status"] == "applied"
    assert mint(ms, leaf[0])[0] == 200  # the file allows it, and so does the twin
    status, problem = mint(ms, "plc-" + leaf[0])  # the twin allows it, the file does not
    assert status == 403 and problem["detail"] == (
        f"no policy rule allows 'gw' the operation 'sas-token' on device 'plc-{leaf[0]}'")


def test_an_invalid_patch_is_rejected_whole_and_the_old_config_kept(
        site: EdgeSite, module_site: Callable[..., ModuleSite]) -> None:
    module = module_site(policy=GW_CAN_MINT).start()
    connected(site)
    assert module.service is not None
    before = module.service.cfg

    version = site.patch({"service": {"rateLimitBurst": 1, "minTtlSeconds": "soon"}})
    config = site.wait_config(version)

    assert config["status"] == "rejected" and config["appliedVersion"] == 1
    assert "'service.minTtlSeconds' must be int, got 'soon'" in config["error"]
    last_error = site.reported()["lastError"]
    assert last_error["source"] == "config" and "'service.minTtlSeconds'" in last_error["message"]
    assert module.service.cfg is before  # nothing half-applied: the valid rateLimitBurst neither

    fixed = site.patch({"service": {"minTtlSeconds": 600}})
    assert site.wait_config(fixed)["status"] == "applied"
    assert (module.service.cfg.rate_limit_burst, module.service.cfg.min_ttl) == (1, 600)


def test_a_burst_of_patches_ends_with_the_last_version_applied(
        site: EdgeSite, module_site: Callable[..., ModuleSite]) -> None:
    """The SDK runs patch handlers on up to four threads, so patches can arrive out of order;
    whatever the order, the last desired version is what ends up applied."""
    module = module_site(policy=GW_CAN_MINT).start()
    connected(site)
    versions = [site.patch({"service": {"rateLimitBurst": burst}}) for burst in range(2, 12)]

    assert site.wait_config(versions[-1])["status"] == "applied"
    assert module.service is not None and module.service.cfg.rate_limit_burst == 11


def test_settings_fixed_at_start_are_rejected_from_the_twin(site: EdgeSite,
                                                            module_site: Callable[..., ModuleSite]) -> None:
    module = module_site(policy=GW_CAN_MINT).start()
    connected(site)

    version = site.patch({"service": {"port": 9443}})
    config = site.wait_config(version)

    assert config["status"] == "rejected"
    assert "'service.port' cannot be set from the module twin" in config["error"]
    assert module.service is not None and module.service.cfg.port == 0


def test_log_level_from_the_twin(site: EdgeSite, module_site: Callable[..., ModuleSite]) -> None:
    module_site(policy=GW_CAN_MINT).start()
    connected(site)
    package = logging.getLogger("spyrus_hsm")
    default = package.level
    try:
        version = site.patch({"logLevel": "debug"})
        assert site.wait_config(version)["status"] == "applied"
        assert package.level == logging.DEBUG
        version = site.patch({"logLevel": None})  # deleted: back to the process's own level
        assert site.wait_config(version)["status"] == "applied"
        assert package.level == default
    finally:
        package.setLevel(default)


# --- direct methods -----------------------------------------------------------------------------


def test_get_status_gives_version_hsm_state_and_the_live_settings(
        site: EdgeSite, module_site: Callable[..., ModuleSite], token_env: Any) -> None:
    module_site(policy=GW_CAN_MINT).start()
    connected(site)

    status, body = site.method("getStatus")

    assert status == 200
    assert body["version"] == __version__
    assert body["module"] == {"deviceId": "edge1", "moduleId": "spyrus_hsm",
                              "hub": "edge-test-hub.azure-devices.net", "gateway": GATEWAY}
    assert body["hsm"]["ready"] is True and body["hsm"]["tokenLabel"] == token_env.label
    assert body["service"]["enabled"] is True
    assert body["service"]["settings"]["rateLimitPerSecond"] == 20.0
    assert body["service"]["settings"]["policy"] == [{**GW_CAN_MINT[0], "keys": []}]


def test_list_credentials_gives_labels_kinds_and_expiry_but_no_secret(
        site: EdgeSite, module_site: Callable[..., ModuleSite], token_env: Any,
        leaf: tuple[str, bytes], x509_label: str) -> None:
    module_site(policy=GW_CAN_MINT).start()
    connected(site)

    status, body = site.method("listCredentials")

    assert status == 200, body
    assert body["token"]["label"] == token_env.label
    items = {i["label"]: i for i in body["items"]}
    assert body["count"] == len(body["items"]) >= 2
    assert items[leaf[0]] == {"label": leaf[0], "kind": "secret-key", "objects": ["secret-key"],
                              "keyType": items[leaf[0]]["keyType"]}
    assert items[x509_label]["notAfter"] == "2033-03-04T05:06:07Z"
    text = json.dumps(body)
    assert base64.b64encode(leaf[1]).decode() not in text and leaf[1].hex() not in text
    assert token_env.pin.decode() not in text


def test_reload_config_applies_the_edited_file_and_names_what_needs_a_restart(
        site: EdgeSite, module_site: Callable[..., ModuleSite]) -> None:
    ms = module_site(policy=GW_CAN_MINT)
    module = ms.start()
    connected(site)
    ms.write_config(rate_limit_burst=7, max_ttl=7200, port=9443)

    status, body = site.method("reloadConfig")

    assert status == 200, body
    assert body["status"] == "applied" and body["source"] == str(ms.config_file)
    assert body["changed"] == ["rateLimitBurst", "maxTtlSeconds"]
    assert body["restartRequired"] == ["service.port"]
    assert module.service is not None
    assert (module.service.cfg.rate_limit_burst, module.service.cfg.max_ttl) == (7, 7200)
    assert module.service.cfg.port == 0  # the listener's, until a restart
    assert site.wait_reported(lambda r: r["config"]["source"] == "file")["config"]["status"] == "applied"


def test_reload_config_keeps_the_twin_over_the_file(site: EdgeSite,
                                                    module_site: Callable[..., ModuleSite]) -> None:
    ms = module_site(policy=GW_CAN_MINT)
    module = ms.start()
    connected(site)
    site.wait_config(site.patch({"service": {"rateLimitBurst": 5}}))
    ms.write_config(rate_limit_burst=7, min_ttl=120)

    status, body = site.method("reloadConfig")

    assert status == 200 and body["changed"] == ["minTtlSeconds"]
    assert module.service is not None
    assert (module.service.cfg.rate_limit_burst, module.service.cfg.min_ttl) == (5, 120)


def test_reload_config_still_applies_the_file_while_the_twin_is_rejected(
        site: EdgeSite, module_site: Callable[..., ModuleSite]) -> None:
    ms = module_site(policy=GW_CAN_MINT)
    module = ms.start()
    connected(site)
    good = site.patch({"service": {"rateLimitBurst": 5}})
    site.wait_config(good)
    bad = site.patch({"service": {"rateLimitBurst": 6, "maxTtlSeconds": "long"}})
    site.wait_config(bad)
    ms.write_config(min_ttl=120)

    status, body = site.method("reloadConfig")

    assert status == 200 and body["changed"] == ["minTtlSeconds"]
    assert "'service.maxTtlSeconds'" in body["twinRejected"]
    assert module.service is not None
    assert (module.service.cfg.rate_limit_burst, module.service.cfg.min_ttl) == (5, 120)  # twin version `good`
    config = site.wait_reported(lambda r: r["config"]["source"] == "file")["config"]
    assert (config["status"], config["desiredVersion"], config["appliedVersion"]) == ("rejected", bad, good)


def test_reload_config_with_a_broken_file_changes_nothing(site: EdgeSite,
                                                          module_site: Callable[..., ModuleSite]) -> None:
    ms = module_site(policy=GW_CAN_MINT)
    module = ms.start()
    connected(site)
    assert module.service is not None
    before = module.service.cfg
    ms.write_config(rate_limit_burst="lots")

    status, body = site.method("reloadConfig")

    assert status == 400 and body["status"] == "rejected"
    assert str(ms.config_file) in body["error"] and "'service.rate_limit_burst' must be int" in body["error"]
    assert module.service.cfg is before
    reported = site.wait_reported(lambda r: r["config"]["status"] == "rejected")
    assert reported["config"]["source"] == "file" and reported["lastError"]["source"] == "config"


def test_an_unknown_method_is_404_listing_the_methods(site: EdgeSite,
                                                      module_site: Callable[..., ModuleSite]) -> None:
    module_site(policy=GW_CAN_MINT).start()
    connected(site)
    status, body = site.method("rotateKeys")
    assert status == 404 and "getStatus, listCredentials, reloadConfig" in body["error"]


# --- secrets ------------------------------------------------------------------------------------


def test_the_module_key_never_reaches_the_logs(site: EdgeSite, module_site: Callable[..., ModuleSite],
                                               caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        ms = module_site(policy=GW_CAN_MINT)
        ms.start()
        connected(site)
        site.wait_config(site.patch({"service": {"rateLimitBurst": "x"}}))
        site.method("getStatus")
        site.method("reloadConfig")
    assert "connected to edgeHub as module edge1/spyrus_hsm" in caplog.text  # logs were captured
    assert site.module_key not in caplog.text
    assert "SharedAccessSignature" not in caplog.text and "sig=" not in caplog.text


# --- connection ---------------------------------------------------------------------------------


def test_desired_changes_made_while_the_sdk_had_given_up_are_applied_once_back(
        site: EdgeSite, hsm: Hsm, monkeypatch: pytest.MonkeyPatch) -> None:
    """edgeHub refusing a reconnect (as while it restarts) ends the SDK's own reconnecting;
    the agent replaces the client, reads the twin again and applies what changed meanwhile."""
    for name, value in site.env.items():
        monkeypatch.setenv(name, value)
    env = detect(os.environ)
    assert env is not None
    applied: list[ServiceConfig] = []
    cfg = Config()
    agent = EdgeAgent(env, EdgeHooks(hsm, cfg, lambda: cfg, lambda svc, _: applied.append(svc)),
                       reconnect_after=1.0).start()
    try:
        site.wait_reported(lambda r: r.get("config"))
        site.emu.add_module("edge1", "spyrus_hsm", symmetric_key=new_symmetric_key())  # edgeHub refuses ...
        assert site.emu.drop_connection("edge1/spyrus_hsm")
        site.emu.wait_for(lambda: site.emu.received.refused_connects("edge1/spyrus_hsm"), timeout=20)
        version = site.patch({"service": {"rateLimitBurst": 3}})  # ... while the desired properties change
        site.emu.add_module("edge1", "spyrus_hsm", symmetric_key=site.module_key)  # ... and is back

        assert site.wait_config(version)["status"] == "applied"
        assert applied[-1].rate_limit_burst == 3
        assert len(site.emu.received.accepted_connects("edge1/spyrus_hsm")) >= 2
    finally:
        assert agent.stop()


# --- HSM unplugged while running (PKCS#11 fault-injection shim) -------------------------------


@pytest.mark.shim
def test_an_unplugged_hsm_is_reported_not_ready_and_ready_again_after_replug(
        site: EdgeSite, module_site: Callable[..., ModuleSite], token_env: Any) -> None:
    token_env.set_shim(state="plugged")
    module_site(policy=GW_CAN_MINT).start()
    connected(site)
    try:
        token_env.set_shim(state="unplugged")
        status, _ = site.method("listCredentials")  # the HSM call that meets the fault ...
        assert status == 503
        reported = site.wait_reported(lambda r: r["hsm"]["ready"] is False)  # ... and is reported
        assert reported["hsm"]["status"] == "degraded" and reported["hsm"]["reason"]
        assert reported["lastError"]["source"] == "hsm"
    finally:
        token_env.set_shim(state="plugged")
    reported = site.wait_reported(lambda r: r["hsm"]["ready"] is True)
    assert reported["hsm"]["recoveries"] == 1
    status, body = site.method("listCredentials")
    assert status == 200 and body["token"]["label"] == token_env.label
