"""Run the emulator standalone until SIGINT/SIGTERM:

    PYTHONPATH=tests .venv/bin/python -m emulator --host 127.0.0.1 --config emulator.yaml

The YAML format is described in ``emulator/config.py``. Without ``tls`` in the config a test
PKI is generated and the CA clients must trust is printed (``root-ca.pem``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from .config import ConfigError, build_emulator, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emulator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, help="override the config's port (default 8883)")
    parser.add_argument("--config", type=Path, required=True, help="YAML file")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    try:
        config = load_config(args.config)
        emulator = build_emulator(config, args.host, args.port)
    except (ConfigError, ValueError) as e:
        print(f"emulator: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        emulator.start()
    except OSError as e:
        print(f"emulator: cannot listen on {args.host}:{emulator.port}: {e}", file=sys.stderr)
        return 1
    ca = (config.pki_dir or config.source.parent / "emulator-pki") / "root-ca.pem"
    print(f"IoT Hub {emulator.hub_hostname} and DPS (id scope {emulator.id_scope}) on "
          f"{args.host}:{emulator.port}", flush=True)  # fmt: skip
    if config.tls_cert is None:
        print(f"clients must trust {ca}", flush=True)
    stop.wait()
    emulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
