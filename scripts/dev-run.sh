#!/usr/bin/env bash
# `make run`: the module on a development SoftHSM2 token, on this machine's loopback only.
#  - a token in .state/dev (created once) with a demo device key, and a SAS token minted by the
#    HSM for it, checked independently;
#  - a development CA, the service's key generated inside the HSM (its certificate, an issuing
#    one for the service's names, signed by that CA and stored beside it: the API handshakes
#    with short-lived in-memory keys it certifies), a demo leaf certificate and a demo bearer token;
#  - then `spyrus-hsm serve` in the foreground, after printing curl commands that work as printed.
# Idempotent. Each spyrus-hsm command is printed before it runs. Nothing leaves this machine.
# SPYRUS_DEV_STATE (default .state/dev), SPYRUS_DEV_PORT (default 8443) and SPYRUS_DEV_METRICS_PORT
# (default 9600, the metrics listener, on 127.0.0.1 too) move it elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
umask 077

STATE="$(realpath -m "${SPYRUS_DEV_STATE:-$PWD/.state/dev}")"
PORT="${SPYRUS_DEV_PORT:-8443}"
METRICS_PORT="${SPYRUS_DEV_METRICS_PORT:-9600}"
BIN="$PWD/.venv/bin"
LABEL="spyrus-dev"
KEY_LABEL="demo-device"
TLS_LABEL="service-tls"
PKI="$STATE/pki"
mkdir -p "$STATE/tokens" "$PKI"

export SOFTHSM2_CONF="$STATE/softhsm2.conf"
export SPYRUS_HSM_CONFIG="$STATE/config.yaml"
[ -f "$SOFTHSM2_CONF" ] || printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' \
  "$STATE/tokens" > "$SOFTHSM2_CONF"
new_secret() { [ -f "$1" ] || "$BIN/python" -c 'import secrets; print(secrets.token_urlsafe(18))' > "$1"; }
new_secret "$STATE/so.pin"
new_secret "$STATE/user.pin"
new_secret "$STATE/bearer.token"
# curl reads the header from this file (-H @file), so the token is never on a command line.
printf 'Authorization: Bearer %s\n' "$(cat "$STATE/bearer.token")" > "$STATE/bearer.header"
BEARER_SHA=$("$BIN/python" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1]).read().strip().encode()).hexdigest())' "$STATE/bearer.token")
cat > "$SPYRUS_HSM_CONFIG" <<YAML
hsm:
  module: /usr/lib/softhsm/libsofthsm2.so
  token_label: $LABEL
  pin_file: $STATE/user.pin
state_dir: $STATE/state
service:
  host: 127.0.0.1
  port: $PORT
  health_port: 0
  tls_key_label: $TLS_LABEL          # never leaves the HSM; certifies the API's short-lived TLS keys
  client_ca_file: $PKI/ca.pem
  bearer_tokens:
    $KEY_LABEL: $BEARER_SHA
  policy:                            # each leaf may get SAS tokens for itself only
    - {principals: ["*"], operations: [sas-token], devices: ["{cn}"]}
  hub: demo-hub.example
metrics:                             # Prometheus text on loopback only (the module's default is 0.0.0.0,
  host: 127.0.0.1                    # for the collector on the IoT Edge module network)
  port: $METRICS_PORT
YAML

run() { printf '+ %s\n' "$*" >&2; "$@"; }
spyrus() { run "$BIN/spyrus-hsm" "$@"; }
has_object() { "$BIN/spyrus-hsm" list --json | "$BIN/python" -c \
  'import json, sys; sys.exit(0 if any(o["label"] == sys.argv[1] and o["type"] == sys.argv[2] for o in json.load(sys.stdin)["objects"]) else 1)' "$1" "$2"; }

echo "# SOFTHSM2_CONF=$SOFTHSM2_CONF SPYRUS_HSM_CONFIG=$SPYRUS_HSM_CONFIG" >&2
if ! "$BIN/spyrus-hsm" list --json >/dev/null 2>&1; then
  spyrus token init --label "$LABEL" --so-pin-file "$STATE/so.pin" --pin-file "$STATE/user.pin"
fi
if ! has_object "$KEY_LABEL" secret-key; then
  # A demo primary key, as Azure would show it (base64). Real keys come from your IoT Hub.
  "$BIN/python" -c 'import base64, secrets; print(base64.b64encode(secrets.token_bytes(32)).decode())' \
    > "$STATE/demo-device.key"
  spyrus key import-sas --label "$KEY_LABEL" --key-file "$STATE/demo-device.key"
fi
TOKEN=$(spyrus sas --key "$KEY_LABEL" --hub demo-hub.example --device-id demo-device --ttl 3600)
echo "SAS token minted inside the HSM for device 'demo-device': ${TOKEN:0:60}..." >&2
# Check it independently with the demo key file (software HMAC), as IoT Hub would.
"$BIN/python" scripts/verify_sas.py "$STATE/demo-device.key" <<<"$TOKEN"

# The service: its key generated in the HSM, an issuing certificate from the development CA
# (one made by an earlier version, which could not issue, is replaced).
run "$BIN/python" scripts/dev_pki.py ca "$PKI"
if ! has_object "$TLS_LABEL" private; then
  spyrus key generate --label "$TLS_LABEL" --type ec-p256
fi
if ! has_object "$TLS_LABEL" cert || ! "$BIN/python" scripts/dev_pki.py can-issue "$PKI/service-chain.pem"; then
  if has_object "$TLS_LABEL" cert; then
    spyrus delete --label "$TLS_LABEL" --type cert
  fi
  spyrus csr --label "$TLS_LABEL" --subject "CN=spyrus-hsm development service" --out "$PKI/service.csr"
  run "$BIN/python" scripts/dev_pki.py sign-server "$PKI" "$PKI/service.csr" "$PKI/service-chain.pem"
  spyrus cert import "$PKI/service-chain.pem" --label "$TLS_LABEL"
fi
run "$BIN/python" scripts/dev_pki.py leaf "$PKI" demo-device
spyrus list

URL="https://127.0.0.1:$PORT"
cat <<TXT

Try it from another terminal (the service starts below; Ctrl-C stops it):

  # readiness (no authentication)
  curl --cacert $PKI/ca.pem $URL/readyz

  # a SAS token for the demo leaf, authenticated by its certificate (mutual TLS)
  curl --cacert $PKI/ca.pem --cert $PKI/demo-device.pem --key $PKI/demo-device.key -H 'Content-Type: application/json' -d '{"deviceId": "demo-device", "ttlSeconds": 3600}' $URL/v1/sas-tokens

  # the same with the demo bearer token (read from a file, never typed on a command line)
  curl --cacert $PKI/ca.pem -H @$STATE/bearer.header -H 'Content-Type: application/json' -d '{"deviceId": "demo-device"}' $URL/v1/sas-tokens

  # denied by policy: the demo leaf asking for another device (403 problem+json)
  curl --cacert $PKI/ca.pem -H @$STATE/bearer.header -H 'Content-Type: application/json' -d '{"deviceId": "someone-else"}' $URL/v1/sas-tokens

  # the API description
  curl --cacert $PKI/ca.pem $URL/openapi.json

Metrics (Prometheus text, this machine only): http://127.0.0.1:$METRICS_PORT/metrics
Audit log: $STATE/state/audit.log

TXT
exec "$BIN/spyrus-hsm" serve
