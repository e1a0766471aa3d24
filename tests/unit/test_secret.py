"""Secrets: kept out of reprs, read from files that only their owner can read."""

import io
import os
from pathlib import Path

import pytest

from spyrus_hsm.hsm import PinFileError, Secret, read_secret_file, read_secret_stream


def test_repr_and_str_never_show_the_value() -> None:
    s = Secret(b"hunter2")
    assert "hunter2" not in repr(s) and "hunter2" not in str(s) and "hunter2" not in f"{s}"
    assert s.reveal() == b"hunter2"


def test_wipe_forgets_the_value() -> None:
    s = Secret(b"hunter2")
    s.wipe()
    assert s.reveal() == b"" and len(s) == 0


def test_pin_file_trailing_newline_is_not_part_of_the_pin(tmp_path: Path) -> None:
    p = tmp_path / "pin"
    p.write_bytes(b"1234\r\n")
    p.chmod(0o600)
    assert read_secret_file(p).reveal() == b"1234"


def test_world_readable_pin_file_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "pin"
    p.write_text("1234")
    p.chmod(0o644)
    with pytest.raises(PinFileError, match="chmod 600"):
        read_secret_file(p)


def test_missing_and_empty_pin_files_say_so(tmp_path: Path) -> None:
    with pytest.raises(PinFileError, match="does not exist"):
        read_secret_file(tmp_path / "none")
    p = tmp_path / "empty"
    p.write_text("\n")
    os.chmod(p, 0o600)
    with pytest.raises(PinFileError, match="is empty"):
        read_secret_file(p)


def test_stream_reads_one_line_per_secret() -> None:
    stream = io.BytesIO(b"first\nsecond\n")
    assert read_secret_stream(stream).reveal() == b"first"
    assert read_secret_stream(stream).reveal() == b"second"
