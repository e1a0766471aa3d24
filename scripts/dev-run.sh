#!/usr/bin/env bash
# `make run`: a development SoftHSM2 token in .state/dev (created once), a demo device key
# imported into it, and a SAS token minted by the HSM for the demo device. Idempotent.
# Each spyrus-hsm command is printed before it runs. Nothing here leaves this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
umask 077

STATE="$PWD/.state/dev"
BIN="$PWD/.venv/bin"
LABEL="spyrus-dev"
KEY_LABEL="demo-device"
mkdir -p "$STATE/tokens"

export SOFTHSM2_CONF="$STATE/softhsm2.conf"
export SPYRUS_HSM_CONFIG="$STATE/config.yaml"
[ -f "$SOFTHSM2_CONF" ] || printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' \
  "$STATE/tokens" > "$SOFTHSM2_CONF"
new_secret() { [ -f "$1" ] || "$BIN/python" -c 'import secrets; print(secrets.token_urlsafe(18))' > "$1"; }
new_secret "$STATE/so.pin"
new_secret "$STATE/user.pin"
cat > "$SPYRUS_HSM_CONFIG" <<YAML
hsm:
  module: /usr/lib/softhsm/libsofthsm2.so
  token_label: $LABEL
  pin_file: $STATE/user.pin
state_dir: $STATE/state
YAML

run() { printf '+ %s\n' "$*" >&2; "$@"; }
spyrus() { run "$BIN/spyrus-hsm" "$@"; }

echo "# SOFTHSM2_CONF=$SOFTHSM2_CONF SPYRUS_HSM_CONFIG=$SPYRUS_HSM_CONFIG" >&2
if ! "$BIN/spyrus-hsm" list --json >/dev/null 2>&1; then
  spyrus token init --label "$LABEL" --so-pin-file "$STATE/so.pin" --pin-file "$STATE/user.pin"
fi
if ! "$BIN/spyrus-hsm" list --json | grep -q "\"label\": \"$KEY_LABEL\""; then
  # A demo primary key, as Azure would show it (base64). Real keys come from your IoT Hub.
  "$BIN/python" -c 'import base64, secrets; print(base64.b64encode(secrets.token_bytes(32)).decode())' \
    > "$STATE/demo-device.key"
  spyrus key import-sas --label "$KEY_LABEL" --key-file "$STATE/demo-device.key"
fi
spyrus list
TOKEN=$(spyrus sas --key "$KEY_LABEL" --hub demo-hub.example --device-id demo-device --ttl 3600)
echo
echo "SAS token minted inside the HSM for device 'demo-device':"
echo "$TOKEN"
# Check it independently with the demo key file (software HMAC), as IoT Hub would.
"$BIN/python" - "$TOKEN" "$STATE/demo-device.key" <<'PY'
import base64, hashlib, hmac, sys
from urllib.parse import parse_qs, quote
token, key_file = sys.argv[1], sys.argv[2]
f = {k: v[0] for k, v in parse_qs(token.split(" ", 1)[1]).items()}
key = base64.b64decode(open(key_file).read().strip())
sig = base64.b64encode(hmac.new(key, f"{quote(f['sr'], safe='')}\n{f['se']}".encode(), hashlib.sha256).digest()).decode()
print("independent check:", "signature verifies" if hmac.compare_digest(sig, f["sig"]) else "MISMATCH")
sys.exit(0 if hmac.compare_digest(sig, f["sig"]) else 1)
PY
