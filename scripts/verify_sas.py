"""Check a SAS token (stdin) against a base64 device key file with a software HMAC, as IoT Hub
does. Exit 0 and print "signature verifies", or exit 1. Used by `make run` and the image test."""

from __future__ import annotations

import base64
import hashlib
import hmac
import sys
from urllib.parse import parse_qs, quote


def main(key_file: str) -> int:
    token = sys.stdin.read().strip()
    fields = {k: v[0] for k, v in parse_qs(token.split(" ", 1)[1]).items()}
    key = base64.b64decode(open(key_file).read().strip())
    mac = hmac.new(key, f"{quote(fields['sr'], safe='')}\n{fields['se']}".encode(), hashlib.sha256).digest()
    ok = hmac.compare_digest(base64.b64encode(mac).decode(), fields["sig"])
    print("independent check:", "signature verifies" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
