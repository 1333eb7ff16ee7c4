#!/usr/bin/env bash
# Move the guest kernel pin (guest/kernel.lock) to the newest signed Debian cloud kernel
# available from the configured apt mirror.
#
#   guest/bump-kernel.sh [--series 6.1|6.12] [--check]
#
# --series switches the kernel series (default: the one already pinned, else 6.1).
# --check only reports whether a newer kernel exists (exit 0: pin is newest, 3: newer).
# The .deb is downloaded into the build cache so the next guest/build.sh is fast.
set -euo pipefail

GUEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$GUEST_DIR")
# shellcheck source=guest/lib.sh
source "$GUEST_DIR/lib.sh"

LOCK=${BOXLITE_KERNEL_LOCK:-$GUEST_DIR/kernel.lock}
CACHE_DIR=${BOXLITE_CACHE_DIR:-$REPO_DIR/build/cache}
SERIES='' CHECK=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --series) SERIES=${2:?--series needs a value}; shift 2 ;;
        --check) CHECK=1; shift ;;
        -h | --help) sed -n '2,10p' "$0"; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
done
[[ -z $SERIES && -f $LOCK ]] && SERIES=$(lock_get "$LOCK" series || true)
SERIES=${SERIES:-6.1}
[[ $SERIES =~ ^[0-9]+\.[0-9]+$ ]] || die "--series must look like 6.1 or 6.12 (got $SERIES)"
OLD_PKG='' OLD_VER=''
if [[ -f $LOCK ]]; then
    OLD_PKG=$(lock_get "$LOCK" package || true)
    OLD_VER=$(lock_get "$LOCK" version || true)
fi

# The lists decide what "newest" means, so refresh them (as root) before looking.
if [[ $(id -u) -eq 0 ]]; then
    apt_update_once || die "apt-get update failed"
elif ! apt_lists_present; then
    die "no apt package lists; run 'apt-get update' as root first"
fi

newest=$(newest_cloud_kernel "$SERIES") || die "no linux-image-$SERIES*-cloud-amd64 package found in the apt lists"
PKG=${newest% *} VER=${newest#* }

if [[ $PKG == "$OLD_PKG" && $VER == "$OLD_VER" ]]; then
    note "already pinned to the newest $SERIES cloud kernel: $PKG=$VER"
    exit 0
fi
if [[ $CHECK -eq 1 ]]; then
    note "newer kernel available: $PKG=$VER (pinned: ${OLD_PKG:-none}=${OLD_VER:-none})"
    exit 3
fi

mkdir -p "$CACHE_DIR"
tmp=$(mktemp -d "$CACHE_DIR/.download.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
deb=$(apt_download "$PKG" "$VER" "$tmp") || die "apt-get download $PKG=$VER failed"
SHA=$(sha256sum "$deb" | cut -d' ' -f1)
# apt already checked the file against the signed index; the index's own hash must agree.
index_sha=$(apt-cache show "$PKG=$VER" | awk '/^SHA256:/ {print $2; exit}')
[[ -z $index_sha || $index_sha == "$SHA" ]] || die "downloaded $PKG=$VER does not match the apt index (sha256 $SHA vs $index_sha)"
mv -f "$deb" "$CACHE_DIR/${PKG}_${VER//:/%3a}_amd64.deb"

cat >"$LOCK.new" <<EOF
# Pinned guest kernel. Written by guest/bump-kernel.sh; read by guest/build.sh.
series=$SERIES
package=$PKG
version=$VER
sha256=$SHA
EOF
mv -f "$LOCK.new" "$LOCK"
note "pinned $PKG=$VER (was ${OLD_PKG:-none}=${OLD_VER:-none}); sha256 $SHA"
note "rebuild the guest bundle and check the module list it reports"
