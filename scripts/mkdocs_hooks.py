"""MkDocs hook (mkdocs.yml `hooks:`): adds the reference pages generated from the code by
scripts/gen_reference.py to the site at build time, so they are never stale and never written
into docs/."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

_SCRIPT = Path(__file__).resolve().parent / "gen_reference.py"


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("gen_reference", _SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_reference"] = module
    spec.loader.exec_module(module)
    return module


def on_files(files: Files, config: Any) -> Files:
    for path, text in _generator().pages().items():
        files.append(File.generated(config, path, content=text))
    return files
