"""A reader that closes standard output early (`spyrus-hsm list | head -1`) ends the command
quietly: no BrokenPipeError traceback, exit code 141 as for a command killed by SIGPIPE."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from spyrus_hsm.cli import EXIT_PIPE
from spyrus_hsm.hsm import Hsm, Secret


def _list_into_a_pipe(token_env: Any, *, read_first_line: bool, unbuffered: bool) -> tuple[int, str]:
    read_end, write_end = os.pipe()
    reader = os.fdopen(read_end, "rb")
    if not read_first_line:
        reader.close()  # closed before the command writes: the first write fails, every time
    env = token_env.env(PYTHONUNBUFFERED="1" if unbuffered else "")
    proc = subprocess.Popen([sys.executable, "-m", "spyrus_hsm", "list"], stdout=write_end,
                            stderr=subprocess.PIPE, env=env)
    os.close(write_end)
    if read_first_line:  # as `head -1` does
        reader.readline()
        reader.close()
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err.decode()


@pytest.mark.parametrize("unbuffered", [True, False], ids=["unbuffered", "buffered"])
def test_list_into_a_closed_pipe_exits_141_without_a_traceback(token_env: Any, unbuffered: bool) -> None:
    for _ in range(3):
        code, err = _list_into_a_pipe(token_env, read_first_line=False, unbuffered=unbuffered)
        assert (code, err) == (EXIT_PIPE, "")


def test_list_piped_into_a_reader_of_one_line_is_quiet(token_env: Any, hsm: Hsm) -> None:
    for i in range(3):  # enough objects for several lines
        hsm.import_secret_key(f"pipe-{os.getpid()}-{i}", Secret(os.urandom(32)))
    for _ in range(5):
        code, err = _list_into_a_pipe(token_env, read_first_line=True, unbuffered=True)
        assert code in (0, EXIT_PIPE) and err == ""
