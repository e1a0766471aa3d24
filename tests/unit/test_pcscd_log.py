"""pcscd's foreground log (with --color) read back at its own level: the colour is the only
place pcscd says it. The lines are as pcscd 1.9.9 printed them."""

from __future__ import annotations

import logging

import pytest

from spyrus_hsm.pcsc.daemon import parse_line

ESC = "\x1b"


@pytest.mark.parametrize("raw, level, text", [
    (f"{ESC}[36m00000026{ESC}[0m [139960383834112] {ESC}[34mpcscdaemon.c:666:main() pcsc-lite 1.9.9 daemon "
     f"ready.{ESC}[0m", logging.INFO, "pcscdaemon.c:666:main() pcsc-lite 1.9.9 daemon ready."),
    (f"{ESC}[36m00003902{ESC}[0m [139960350258880] {ESC}[35mifdwrapper.c:477:IFDControl() Card not "
     f"transacted: 606{ESC}[0m", logging.ERROR, "ifdwrapper.c:477:IFDControl() Card not transacted: 606"),
    (f"{ESC}[36m00000010{ESC}[0m [1399] {ESC}[01;31mpcscdaemon.c:420:main() file /run/pcscd/pcscd.comm "
     f"already exists.{ESC}[0m", logging.CRITICAL,
     "pcscdaemon.c:420:main() file /run/pcscd/pcscd.comm already exists."),
    (f"{ESC}[36m00000005{ESC}[0m [1399] readerfactory.c:881:RFLoadReader() detail", logging.DEBUG,
     "readerfactory.c:881:RFLoadReader() detail"),
    ("00000000 debuglog.c:386:DebugLogSetLevel() debug level=info", logging.DEBUG,
     "debuglog.c:386:DebugLogSetLevel() debug level=info"),
])
def test_each_line_keeps_its_level_and_loses_its_colours(raw: str, level: int, text: str) -> None:
    assert parse_line(raw) == (level, text)
