"""The test session's loopback addresses (tests/addresses.py): two sessions never share a block,
and no port is handed out twice."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import addresses
import pytest

TESTS = Path(__file__).resolve().parents[1]


def _claim_in_another_process(first_choice: int) -> int:
    """The block another session claims when its random pick comes up with `first_choice` first."""
    code = ("import random, addresses\n"
            f"random.sample = lambda seq, k: [{first_choice}] + [n for n in seq if n != {first_choice}]\n"
            "print(addresses.block().number)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30,
                          check=True)
    return int(proc.stdout)


def test_another_session_that_picks_this_sessions_block_takes_another_one() -> None:
    mine = addresses.block().number
    assert _claim_in_another_process(mine) != mine


def test_a_block_is_free_again_once_its_session_has_ended() -> None:
    mine = addresses.block().number
    other = _claim_in_another_process(mine)
    assert _claim_in_another_process(other) == other  # the first other process has ended


def test_hosts_are_the_sessions_own_and_handed_out_once() -> None:
    block = addresses.block()
    hosts = [addresses.host() for _ in range(50)]
    assert len(set(hosts)) == len(hosts)
    assert all(ipaddress.ip_address(h) in block.network and not h.startswith("127.0.") for h in hosts)


def test_ports_are_handed_out_once_and_127_0_0_1_ones_lie_below_the_ephemeral_range() -> None:
    host = addresses.host()
    own = [addresses.port(host) for _ in range(20)] + [addresses.port(addresses.host()) for _ in range(20)]
    assert len(set(own)) == len(own)
    loopback = [addresses.port(addresses.LOOPBACK) for _ in range(5)]
    assert len(set(loopback)) == len(loopback) and max(loopback) < 32_768


def test_a_port_on_an_address_the_session_does_not_own_is_refused() -> None:
    with pytest.raises(ValueError, match="not an address of this test session"):
        addresses.port("127.0.0.21")
