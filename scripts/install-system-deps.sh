#!/usr/bin/env bash
# Installs the Debian 12 packages spyrus-hsm needs, once. Idempotent: it does nothing when
# everything is present. pkcs11-provider comes from bookworm-backports, enabled by adding
# the suite to the existing deb822 sources file (no host is named here).
set -euo pipefail

packages=(python3 python3-venv python3-dev gcc make libc6-dev libp11-kit-dev softhsm2 opensc openssl curl ca-certificates)
backports=(pkcs11-provider)
# PC/SC: pcscd with libccid (the Rosetta is a CCID reader), libpcsclite (its client library, and
# the headers the test shim builds with), and for the tests a virtual reader driver (vpcd) and
# card emulator (vpicc, whose Python half is python3-virtualsmartcard).
packages+=(pcscd libccid libpcsclite1 libpcsclite-dev vsmartcard-vpcd vsmartcard-vpicc python3-virtualsmartcard)
# Prometheus (its server and promtool): `make test` checks the alert rules and a live scrape of
# the metrics endpoint with Prometheus's own tools. Only the binaries are used; the Debian
# service it installs is stopped and disabled below, as the tests start their own server.
packages+=(prometheus)
# Leaf devices' TLS stacks: the tests build small mbedTLS and wolfSSL clients (tests/leafstacks)
# and run gnutls-cli, to check that every stack a leaf may use verifies the API's chain (mbedTLS
# and wolfSSL reject profiles OpenSSL accepts).
packages+=(libmbedtls-dev libwolfssl-dev gnutls-bin)
# A second PKCS#11 implementation for the token matrix (tests/tpm_rig.py): the `token_matrix`
# tests run again on tpm2-pkcs11 over a software TPM (swtpm), reached through the resource
# manager tpm2-abrmd (its TCTI library: libtss2-tcti-tabrmd0) on a private D-Bus session bus;
# tokens are made with tpm2_ptool. Catches what the module assumes of SoftHSM2.
packages+=(swtpm swtpm-tools libtpm2-pkcs11-1 libtpm2-pkcs11-tools tpm2-tools tpm2-abrmd libtss2-tcti-tabrmd0 dbus)

missing=()
for p in "${packages[@]}" "${backports[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "error: missing Debian packages: ${missing[*]}; run 'make deps' as root or install them." >&2
  exit 2
fi

sources=/etc/apt/sources.list.d/debian.sources
if [ -f "$sources" ] && ! grep -q 'bookworm-backports' "$sources"; then
  sed -i 's/^Suites: bookworm bookworm-updates$/& bookworm-backports/' "$sources"
fi
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "error: could not enable bookworm-backports (needed for pkcs11-provider);" \
       "add it to your apt sources and re-run." >&2
  exit 2
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${packages[@]}"
apt-get install -y -q --no-install-recommends -t bookworm-backports "${backports[@]}"
# The package starts a system Prometheus on :9090 where systemd runs; the project needs only the
# binaries, so keep that service off (no-op in a container without systemd).
if command -v systemctl >/dev/null 2>&1 && systemctl is-enabled prometheus >/dev/null 2>&1; then
  systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
