"""Fixtures: `site` (the emulator as edgeHub with this module's identity), `module_site`
(a Module with its config file, under that edge environment) and `serve` (`spyrus-hsm serve`
in its own process under it). See tests/edge_harness.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from edge_harness import GATEWAY, HUB, EdgeSite, ModuleSite, ServeProcess

from emulator import Emulator
from emulator.pki import EmulatorPki


@pytest.fixture
def site(make_emulator: Callable[..., Emulator], emulator_pki: EmulatorPki) -> EdgeSite:
    return EdgeSite(make_emulator(GATEWAY, hub_hostname=HUB), emulator_pki)


@pytest.fixture
def module_site(token_env: Any, tmp_path: Path, emulator_pki: EmulatorPki, site: EdgeSite,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., ModuleSite]]:
    """Factory: `module_site(policy=[...])` -> a ModuleSite (not started) under the edge
    environment of `site`; stopped at teardown, which must take less than edgeAgent's 10 s."""
    for name, value in site.env.items():
        monkeypatch.setenv(name, value)
    made: list[ModuleSite] = []

    def factory(**service: Any) -> ModuleSite:
        made.append(ModuleSite(token_env, tmp_path, emulator_pki, service))
        return made[-1]

    yield factory
    for m in made:
        if m.running is not None:
            assert m.running.stop(), "the module did not stop within 10 s"


@pytest.fixture
def serve(token_env: Any, tmp_path: Path, site: EdgeSite) -> Iterator[Callable[..., ServeProcess]]:
    """Factory: `serve(token_label, pin_file, config="")` -> a running ServeProcess; killed at
    teardown if still running."""
    started: list[ServeProcess] = []

    def start(token_label: str, pin_file: Path, config: str = "") -> ServeProcess:
        started.append(ServeProcess(token_env, tmp_path, site, token_label, pin_file, config))
        return started[-1]

    yield start
    for p in started:
        p.kill()
