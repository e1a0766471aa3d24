#!/usr/bin/env bash
# Builds a local stand-in for the public debian:bookworm-slim image with debootstrap, for
# machines that reach Debian's package mirror but no container registry. Does nothing when the
# image already exists. The mirror is read from this machine's apt sources at run time.
#
#   scripts/debian-base-image.sh [IMAGE [ARCH]]
#
# IMAGE defaults to localhost/debian:bookworm-slim, ARCH (a Debian architecture) to this
# machine's. A foreign ARCH (arm64 on amd64) needs qemu-user-static's binfmt handlers, which
# scripts/image-test.sh --arch sets up: debootstrap's second stage runs the target's binaries.
#
# PODMAN may name the podman command with its global flags (see scripts/image-test.sh).
set -euo pipefail

image=${1:-localhost/debian:bookworm-slim}
arch=${2:-$(dpkg --print-architecture)}
read -r -a podman <<< "${PODMAN:-podman}"

if "${podman[@]}" image exists "$image"; then
  echo "base image $image exists; not rebuilding"
  exit 0
fi

sources=/etc/apt/sources.list.d/debian.sources
[ -f "$sources" ] || { echo "error: $sources not found; cannot tell which Debian mirror to use" >&2; exit 2; }
# deb822 stanzas: the first URIs line is the main archive, one serving bookworm-security the other.
mirror=$(awk '/^URIs:/ { print $2; exit }' "$sources")
security=$(awk '/^URIs:/ { uri = $2 } /^Suites:.*bookworm-security/ { print uri; exit }' "$sources")
[ -n "$mirror" ] || { echo "error: no URIs: line in $sources" >&2; exit 2; }

rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
chmod 0755 "$rootfs"   # it becomes the image's /; mktemp made it 0700

echo "debootstrap bookworm (minbase, $arch) from the mirror in $sources"
debootstrap --variant=minbase --arch="$arch" bookworm "$rootfs" "$mirror" > "$rootfs.log" 2>&1 \
  || { tail -20 "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 1; }
rm -f "$rootfs.log"

# What the official image has: deb822 sources only, apt without a package cache, and the
# "slim" dpkg path exclusions.
rm -f "$rootfs/etc/apt/sources.list"
{
  printf 'Types: deb\nURIs: %s\nSuites: bookworm bookworm-updates\nComponents: main\n' "$mirror"
  printf 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n'
  if [ -n "$security" ]; then
    printf '\nTypes: deb\nURIs: %s\nSuites: bookworm-security\nComponents: main\n' "$security"
    printf 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n'
  fi
} > "$rootfs/etc/apt/sources.list.d/debian.sources"
cat > "$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
echo 'Acquire::Languages "none";' > "$rootfs/etc/apt/apt.conf.d/docker-no-languages"
echo 'Acquire::GzipIndexes "true";' > "$rootfs/etc/apt/apt.conf.d/docker-gzip-indexes"
cat > "$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/lintian/*
EOF
find "$rootfs/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete
rm -rf "$rootfs"/usr/share/{info,locale,man,groff,lintian}/* \
       "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*

tar -C "$rootfs" -c . | "${podman[@]}" import --os linux --arch "$arch" > /dev/null \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["bash"]' - "$image"
echo "imported $image"
