#!/usr/bin/env bash
# `make image-test`: build the amd64 image with podman on this machine (no Docker engine, no
# registry needed) and test it for real with tests/image. As root; idempotent.
#
#   scripts/image-test.sh [--arch amd64|arm64]      (default amd64)
#
# --arch arm64 (`make image-test-arm64`) does the same for Dockerfile.arm64v8 on an amd64
# machine: the image's programs run under qemu-user-static through binfmt_misc, set up here.
#
# 1. podman, buildah, runc and debootstrap from Debian if missing (arm64: qemu-user-static too);
# 2. the base: a local stand-in for debian:bookworm-slim made with debootstrap, kept between runs;
# 3. the image from Dockerfile.<arch> with --build-arg BASE_IMAGE=<the stand-in>;
# 4. pytest tests/image against it (a SoftHSM2 token, TLS files and a bearer token made here;
#    for PC/SC, this machine's pcscd and a virtual card: see tests/image/test_image_pcsc.py);
# 5. removal of the test image, its build stage and containers (the base stays cached;
#    IMAGE_TEST_KEEP=1 keeps the image too, for a look inside).
#
# The podman flags are the ones this kind of sandbox needs (vfs storage, cgroupfs, runc, low
# ulimits); a storage root of its own keeps them apart from any other podman use on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."

arch=amd64
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) arch=${2:-}; shift 2 || { echo "error: --arch needs amd64 or arm64" >&2; exit 2; } ;;
    --arch=*) arch=${1#--arch=}; shift ;;
    *) echo "usage: $0 [--arch amd64|arm64]" >&2; exit 2 ;;
  esac
done
case "$arch" in
  amd64) dockerfile=Dockerfile.amd64; base_default=localhost/debian:bookworm-slim
         image_default=localhost/spyrus-hsm:image-test ;;
  arm64) dockerfile=Dockerfile.arm64v8; base_default=localhost/arm64v8/debian:bookworm-slim
         image_default=localhost/spyrus-hsm:image-test-arm64 ;;
  *) echo "error: --arch $arch: amd64 or arm64" >&2; exit 2 ;;
esac

BASE_IMAGE=${BASE_IMAGE:-$base_default}
IMAGE=${IMAGE:-$image_default}
PODMAN=${PODMAN:-podman --root /var/lib/containers/spyrus-hsm --runroot /run/containers/spyrus-hsm \
--storage-driver=vfs --cgroup-manager=cgroupfs --runtime runc}
ULIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
# The PC/SC tests (tests/image/test_image_pcsc.py) need the virtual reader driver in the image.
EXTRA_PACKAGES=${EXTRA_PACKAGES:-vsmartcard-vpcd}
export PODMAN IMAGE
read -r -a podman <<< "$PODMAN"
started=$SECONDS

tools=(podman buildah runc debootstrap)
foreign=0
cross=
if [ "$arch" != "$(dpkg --print-architecture)" ]; then
  # The PC/SC image tests mount the test shim into the container: it is built for $arch too.
  foreign=1
  cross=$(case "$arch" in arm64) echo aarch64-linux-gnu ;; *) echo "$arch-linux-gnu" ;; esac)
  tools+=(qemu-user-static "gcc-$cross" "libc6-dev-$arch-cross")
fi
missing=()
for p in "${tools[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: missing Debian packages: ${missing[*]}; run 'make image-test' as root or install them." >&2
    exit 2
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
    || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"; }
fi

if [ "$foreign" = 1 ]; then
  # qemu-user-static's handlers are registered by systemd-binfmt at boot or package install;
  # a container or a machine booted without it needs binfmt_misc mounted and them loaded.
  binfmt=/proc/sys/fs/binfmt_misc
  qemu=qemu-$(case "$arch" in arm64) echo aarch64 ;; *) echo "$arch" ;; esac)
  [ -e "$binfmt/register" ] || mount -t binfmt_misc binfmt_misc "$binfmt"
  [ -e "$binfmt/$qemu" ] || /lib/systemd/systemd-binfmt "/usr/lib/binfmt.d/$qemu.conf"
  grep -q '^enabled' "$binfmt/$qemu" \
    || { echo "error: the binfmt_misc handler $qemu is not enabled; cannot run $arch programs" >&2; exit 1; }
  echo "running $arch programs through $(sed -n 's/^interpreter //p' "$binfmt/$qemu")"
fi

bash scripts/debian-base-image.sh "$BASE_IMAGE" "$arch"
if [ -n "$cross" ]; then
  mkdir -p ".build/$arch"
  make --no-print-directory CC="$cross-gcc" SHIM=".build/$arch/libp11shim.so" shim
  export SPYRUS_IMAGE_SHIM=".build/$arch/libp11shim.so"
fi

cleanup() {
  "${podman[@]}" ps -a -q --filter "ancestor=$IMAGE" | xargs -r "${podman[@]}" rm -f > /dev/null || true
  rm -rf "$work"
  [ "${IMAGE_TEST_KEEP:-0}" = 1 ] && return
  "${podman[@]}" rmi -f "$IMAGE" > /dev/null 2>&1 || true
  "${podman[@]}" image prune -f > /dev/null || true   # the untagged build stage
}
work=$(mktemp -d)
trap cleanup EXIT

# This machine's package traffic may need its own CA bundle and pip settings; they go into the
# build as mounts only (never into the Dockerfile or the image). The bundle is mounted beside,
# not over, Debian's: the image's own ca-certificates package rewrites that file.
build_mounts=()
host_ca=/etc/ssl/certs/ca-certificates.crt
build_ca=/run/build-host-ca/ca-certificates.crt
if [ -f "$host_ca" ]; then
  build_mounts+=(-v "$host_ca:$build_ca:ro")
fi
if [ -f /etc/pip.conf ]; then
  sed "s|$host_ca|$build_ca|g" /etc/pip.conf > "$work/pip.conf"
  build_mounts+=(-v "$work/pip.conf:/etc/pip.conf:ro")
fi

echo "building $IMAGE from $dockerfile on $BASE_IMAGE"
build_started=$SECONDS
"${podman[@]}" build --format docker --network=host "${ULIMITS[@]}" "${build_mounts[@]}" \
  --platform "linux/$arch" --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "EXTRA_PACKAGES=$EXTRA_PACKAGES" \
  -f "$dockerfile" -t "$IMAGE" . > "$work/build.log" 2>&1 \
  || { tail -40 "$work/build.log" >&2; echo "error: image build failed" >&2; exit 1; }
build_seconds=$((SECONDS - build_started))
size=$("${podman[@]}" image inspect "$IMAGE" --format '{{.Size}}')
image_arch=$("${podman[@]}" image inspect "$IMAGE" --format '{{.Architecture}}')
[ "$image_arch" = "$arch" ] || { echo "error: $IMAGE is built for $image_arch, not $arch" >&2; exit 1; }
echo "image $IMAGE ($arch): built in ${build_seconds} s, size $size bytes ($((size / 1000000)) MB)"

SPYRUS_IMAGE_TEST=1 SPYRUS_IMAGE_ARCH=$arch .venv/bin/python -m pytest -q -s -p no:cacheprovider tests/image
echo "image-test ($arch) finished in $((SECONDS - started)) s (build ${build_seconds} s, size $size bytes)"
