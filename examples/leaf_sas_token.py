"""A leaf device's SAS token from the spyrus-hsm module on its gateway, with nothing but the standard
library and `spyrus-hsm-leaf` (leaf/pyproject.toml): for a leaf whose own MQTT or AMQP client
connects to IoT Hub through edgeHub with a SAS token as its password. The bearer token is read
from a file, never from the command line; the SAS token goes to standard output, its expiry to
standard error.

    LEAF_SERVICE_URL=https://edge-gw:8443 LEAF_TRUST_ANCHOR=edge-ca.pem LEAF_DEVICE_ID=leaf-17 \\
    LEAF_BEARER_TOKEN_FILE=/run/secrets/leaf-17 python3 leaf_sas_token.py > /run/leaf-17.sas
"""

import os
import sys
from pathlib import Path

from spyrus_hsm.errors import SpyrusError
from spyrus_hsm.leaf import TokenService

env = os.environ
try:
    tokens = TokenService(env["LEAF_SERVICE_URL"], env["LEAF_TRUST_ANCHOR"], env["LEAF_DEVICE_ID"],
                          bearer_token=Path(env["LEAF_BEARER_TOKEN_FILE"]).read_text().strip(),
                          ttl=int(env.get("LEAF_TTL", "3600")))
    token = tokens.fetch()
except KeyError as missing:
    sys.exit(f"set {missing} (see the top of {sys.argv[0]})")
except (OSError, ValueError, SpyrusError) as exc:
    sys.exit(f"no SAS token: {exc}")
print(token.token)
print(f"expires at {token.expires_on} (in {token.lifetime:.0f} s)", file=sys.stderr)
