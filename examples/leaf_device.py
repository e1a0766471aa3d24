"""A leaf device behind an IoT Edge gateway, with no key of its own: the spyrus-hsm module on the
gateway signs its SAS tokens (bearer token in a file, never on the command line) and the device
sends telemetry through edgeHub, renewing its token through the module before it expires.

    LEAF_SERVICE_URL=https://edge-gw:8443 LEAF_GATEWAY=edge-gw LEAF_TRUST_ANCHOR=edge-ca.pem \\
    LEAF_DEVICE_ID=leaf-17 LEAF_BEARER_TOKEN_FILE=/run/secrets/leaf-17 python leaf_device.py
"""

import json
import os
import time
from pathlib import Path

from spyrus_hsm.leaf import LeafDevice, TokenService

env = os.environ
tokens = TokenService(env["LEAF_SERVICE_URL"], env["LEAF_TRUST_ANCHOR"], env["LEAF_DEVICE_ID"],
                      bearer_token=Path(env["LEAF_BEARER_TOKEN_FILE"]).read_text().strip())
with LeafDevice(tokens, gateway_hostname=env["LEAF_GATEWAY"], trust_anchor=env["LEAF_TRUST_ANCHOR"]) as leaf:
    for n in range(int(env.get("LEAF_MESSAGES", "10"))):
        leaf.client.send_message(json.dumps({"n": n, "at": time.time()}))
        print(f"sent message {n}; token expires at {leaf.expires_on}")
        time.sleep(float(env.get("LEAF_INTERVAL", "1")))
