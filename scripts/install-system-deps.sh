#!/usr/bin/env bash
# Installs the system packages boxlite builds and tests with, only when something is missing.
# Debian/Ubuntu only; elsewhere it says what to install and fails.
set -euo pipefail

# command -> package that provides it
declare -A NEEDED=(
  [qemu-system-x86_64]=qemu-system-x86
  [qemu-img]=qemu-utils
  [mkfs.ext4]=e2fsprogs
  [cpio]=cpio
  [busybox]=busybox-static
  [docker-registry]=docker-registry
  [umoci]=umoci
  [skopeo]=skopeo
  [htpasswd]=apache2-utils
  [depmod]=kmod
  [node]=nodejs  # the Node.js kernel's unit test (tests/test_node_kernel_unit.py)
)

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }

# header -> package (virtiofsd, built from crates.io, links against them)
declare -A HEADERS=(
  [/usr/include/seccomp.h]=libseccomp-dev
  [/usr/include/cap-ng.h]=libcap-ng-dev
)

missing=()
for cmd in "${!NEEDED[@]}"; do
  have "$cmd" || missing+=("${NEEDED[$cmd]}")
done
for header in "${!HEADERS[@]}"; do
  [ -e "$header" ] || missing+=("${HEADERS[$header]}")
done
# busybox must be the static build: it is copied into images.
[ -x /bin/busybox ] && file -L /bin/busybox 2>/dev/null | grep -q "dynamically" && missing+=(busybox-static)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "missing system packages: ${missing[*]} (install them with your package manager)" >&2
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "missing system packages: ${missing[*]}; run: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi

echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# qemu-system-x86 conflicts with a newer backported qemu-utils: take both from the release.
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
packages=()
for p in "${missing[@]}"; do
  [ "$p" = qemu-utils ] || packages+=("$p")
done
if printf '%s\n' "${missing[@]}" | grep -qx 'qemu-system-x86' && [ -n "$codename" ]; then
  packages+=("qemu-utils/$codename")
elif printf '%s\n' "${missing[@]}" | grep -qx 'qemu-utils'; then
  packages+=(qemu-utils)
fi
apt-get install -y -qq --no-install-recommends --allow-downgrades kmod file "${packages[@]}"
