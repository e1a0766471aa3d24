"""The documentation site: `mkdocs build --strict` passes (a broken link, anchor or a page left
out of the navigation fails it), and the reference pages it generates from the code name every
configuration key, CLI command, HTTP route, metric and upstream event type, read back from the
built HTML."""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
MKDOCS = Path(sys.executable).with_name("mkdocs")
README_MAX_LINES = 150


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "scripts" / "gen_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_reference"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gen = _generator()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    built = subprocess.run([str(MKDOCS), "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300,
                           env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert built.returncode == 0, built.stderr[-4000:]
    return out


def text_of(site: Path, page: str) -> str:
    """The page's visible text (tags removed, entities decoded)."""
    raw = (site / page / "index.html").read_text(encoding="utf-8")
    body = raw.split('<article class="md-content__inner md-typeset">', 1)[1].split("</article>", 1)[0]
    return html.unescape(re.sub(r"<[^>]+>", "", body))


def test_every_configuration_key_is_in_the_reference_with_its_default(site: Path) -> None:
    text = text_of(site, "reference/configuration")
    keys = [key for key, _, _ in gen.config_keys()]
    assert len(keys) > 60
    missing = [key for key in keys if key not in text]
    assert not missing, missing
    raw = (site / "reference" / "configuration" / "index.html").read_text(encoding="utf-8")
    row = html.unescape(re.sub(r"<[^>]+>", " ", next(r for r in raw.split("<tr>") if ">hsm.queue_limit<" in r)))
    assert "256" in row and "1 to 100000" in row, row


def test_every_environment_variable_and_twin_key_is_in_the_configuration_reference(site: Path) -> None:
    from spyrus_hsm import config
    from spyrus_hsm.edge import twin

    text = text_of(site, "reference/configuration")
    names = [*config._ENV, *(f"service.{k}" for k in twin.LIVE), *(f"cloud.{k}" for k in twin.CLOUD_LIVE)]
    assert not [n for n in names if n not in text]


def test_every_cli_command_is_in_the_reference(site: Path) -> None:
    text = text_of(site, "reference/cli")
    commands = [path for path, _, _ in gen.cli_commands()]
    assert {"serve", "token init", "key generate", "aziot-config", "renew"} <= set(commands)
    assert not [c for c in commands if f"spyrus-hsm {c}" not in text]


def test_every_route_is_in_the_api_reference(site: Path) -> None:
    text = text_of(site, "reference/http-api")
    routes = [f"{method} {path}" for method, path, _ in gen.api_routes()]
    assert "POST /v1/sas-tokens" in routes and "GET /readyz" in routes
    assert not [r for r in routes if r not in text]


def test_every_metric_is_in_the_metrics_reference(site: Path) -> None:
    text = text_of(site, "reference/metrics")
    names = [i.prometheus for i in gen.instruments()]
    assert "spyrus_hsm_certificate_not_after_timestamp_seconds" in names
    assert "spyrus_hsm_hsm_ready" in names and "spyrus_hsm_audit_dropped_total" in names
    assert not [n for n in names if n not in text]


def test_every_upstream_event_type_is_in_the_events_reference(site: Path) -> None:
    text = text_of(site, "reference/events")
    types = list(gen.event_types())
    assert {"hsm.unavailable", "hsm.pinRefused", "hsm.recovered", "certificate.expiring"} <= set(types)
    assert not [t for t in types if t not in text]


def test_the_metric_names_in_docs_and_alerts_are_ones_the_code_makes() -> None:
    """A renamed metric must be renamed in the hand-written pages and the alert rules too."""
    made = {s for i in gen.instruments() for s in i.series}
    files = [*(ROOT / "docs").rglob("*.md"), ROOT / "README.md", ROOT / "deployments" / "prometheus" / "alerts.yml",
             ROOT / "deployments" / "prometheus" / "alerts.test.yml"]
    unknown = {(f.name, name) for f in files for name in re.findall(r"\bspyrus_hsm_[a-z0-9_]+", f.read_text())
               if name not in made}
    assert not unknown, sorted(unknown)


def test_the_readme_is_a_landing_page() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, len(lines)
    for target in re.findall(r"\]\(((?:docs|deployments)/[^)#]+)", "\n".join(lines)):
        assert (ROOT / target).exists(), target
