#!/usr/bin/env bash
# Build the guest bundle: OUT_DIR/{vmlinuz,initramfs.cpio,manifest.json}.
#
#   guest/build.sh AGENT_BINARY OUT_DIR
#
# The kernel comes from the Debian package pinned in guest/kernel.lock (fetched with
# apt-get download into $BOXLITE_CACHE_DIR, default build/cache, and checked against
# the pinned sha256). The initramfs holds the agent as /init, the modules listed in
# guest/modules.txt plus their dependencies, and their load order. The same inputs
# give byte-identical outputs. See guest/README.md.
set -euo pipefail

GUEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$GUEST_DIR")
# shellcheck source=guest/lib.sh
source "$GUEST_DIR/lib.sh"

FORMAT_VERSION=1
# Measured under TCG (guest/README.md): gzip and lz4 save nothing at this size (gzip
# was 20-60 ms slower, lz4 a tie), so the kernel gets the archive as is.
COMPRESSION=${BOXLITE_INITRAMFS_COMPRESSION:-none}
# The kernel command line the measurements in guest/README.md recommend; the runtime
# may use it from the manifest so the two stay together.
RECOMMENDED_CMDLINE="console=ttyS0 panic=-1 quiet cryptomgr.notests noreplace-smp"

[[ $# -eq 2 ]] || { echo "usage: $0 AGENT_BINARY OUT_DIR" >&2; exit 2; }
AGENT=$(realpath -e -- "$1") || die "agent binary not found: $1"
OUT_DIR=$(realpath -m -- "$2")
LOCK=${BOXLITE_KERNEL_LOCK:-$GUEST_DIR/kernel.lock}
MODULES_TXT="$GUEST_DIR/modules.txt"
CACHE_DIR=${BOXLITE_CACHE_DIR:-$REPO_DIR/build/cache}

export LC_ALL=C TZ=UTC SOURCE_DATE_EPOCH=0
umask 022

for tool in apt-get apt-cache dpkg-deb depmod cpio sha256sum; do
    command -v "$tool" >/dev/null || die "'$tool' not found (Debian: apt-get install apt dpkg kmod cpio coreutils)"
done

# --- the agent -------------------------------------------------------------------------
[[ -f $AGENT ]] || die "agent binary is not a regular file: $AGENT"
[[ $(head -c4 "$AGENT" | od -An -tx1 | tr -d ' \n') == 7f454c46 ]] ||
    die "agent binary is not an ELF executable: $AGENT"
# There is no dynamic loader in the initramfs; a dynamic /init only shows up as a
# kernel panic ("No working init found"), so catch it here.
if command -v readelf >/dev/null && readelf -lW "$AGENT" 2>/dev/null | grep -q 'Requesting program interpreter'; then
    die "agent binary is dynamically linked: $AGENT (build it static, e.g. RUSTFLAGS='-C target-feature=+crt-static' --target x86_64-unknown-linux-gnu)"
fi

# --- the pinned kernel package -----------------------------------------------------------
[[ -f $LOCK ]] || die "missing $LOCK (create it with guest/bump-kernel.sh)"
SERIES=$(lock_get "$LOCK" series) || SERIES=6.1
PKG=$(lock_get "$LOCK" package) || die "$LOCK has no package="
VER=$(lock_get "$LOCK" version) || die "$LOCK has no version="
SHA=$(lock_get "$LOCK" sha256) || die "$LOCK has no sha256="
[[ $SHA =~ ^[0-9a-f]{64}$ ]] || die "$LOCK: sha256= is not 64 lowercase hex digits"

CLEANUP=()
trap 'rm -rf "${CLEANUP[@]}"' EXIT
mkdir -p "$CACHE_DIR"
# apt names the file PKG_VERSION_ARCH.deb with an epoch's ':' written as %3a.
DEB="$CACHE_DIR/${PKG}_${VER//:/%3a}_amd64.deb"

verify_deb() { [[ $(sha256sum "$1" | cut -d' ' -f1) == "$SHA" ]]; }

not_available() {
    local newest
    newest=$(newest_cloud_kernel "$SERIES" || true)
    if [[ -n $newest ]]; then
        newest="package=${newest% *} version=${newest#* }"
    fi
    die "the pinned kernel $PKG=$VER ($LOCK) is no longer available from the apt mirror.
  newest available in series $SERIES: ${newest:-none found}
  run guest/bump-kernel.sh to move the pin, then rebuild."
}

fetch_deb() {
    local tmp got
    # Download next to the cache so the final mv is an atomic rename.
    tmp=$(mktemp -d "$CACHE_DIR/.download.XXXXXX")
    CLEANUP+=("$tmp")
    if ! apt_lists_present || ! version_available "$PKG" "$VER"; then
        apt_update_once || die "cannot refresh the apt package lists"
        version_available "$PKG" "$VER" || not_available
    fi
    note "downloading $PKG=$VER"
    got=$(apt_download "$PKG" "$VER" "$tmp") || {
        # Stale lists point at files the mirror has dropped: refresh once and retry.
        apt_update_once || die "apt-get download $PKG=$VER failed"
        version_available "$PKG" "$VER" || not_available
        got=$(apt_download "$PKG" "$VER" "$tmp") || die "apt-get download $PKG=$VER failed"
    }
    if ! verify_deb "$got"; then
        die "sha256 MISMATCH for $PKG=$VER
  expected ($LOCK): $SHA
  downloaded: $(sha256sum "$got" | cut -d' ' -f1)
  The mirror serves different bytes under the pinned version. Do not build with it;
  if the change is legitimate, re-pin with guest/bump-kernel.sh."
    fi
    mv -f "$got" "$DEB"
    rm -rf "$tmp"
}

if [[ -f $DEB ]]; then
    if ! verify_deb "$DEB"; then
        note "cached $DEB does not match the pinned sha256; discarding it and downloading again"
        rm -f "$DEB"
        fetch_deb
    fi
else
    fetch_deb
fi

# --- extract the kernel and resolve modules ------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/boxlite-guest.XXXXXX")
CLEANUP+=("$WORK")
KTREE="$WORK/kernel"
dpkg-deb -x "$DEB" "$KTREE"

# Newer Debian packages ship modules under usr/lib/modules; depmod -b looks in lib/.
if [[ ! -d $KTREE/lib/modules && -d $KTREE/usr/lib/modules ]]; then
    ln -s usr/lib "$KTREE/lib"
fi
mapfile -t releases < <(find "$KTREE/lib/modules/" -mindepth 1 -maxdepth 1 -type d -printf '%f\n')
[[ ${#releases[@]} -eq 1 ]] || die "expected one kernel release in $PKG, found: ${releases[*]:-none}"
KREL=${releases[0]}
VMLINUZ_SRC="$KTREE/boot/vmlinuz-$KREL"
[[ -f $VMLINUZ_SRC ]] || die "$PKG has no boot/vmlinuz-$KREL"
MODDIR="$KTREE/lib/modules/$KREL"

# The package ships no modules.dep: make one.
depmod -b "$KTREE" "$KREL"

declare -A MOD_PATH=() MOD_DEPS=() BUILTIN=()
# Module name of a path, in REPLY (no subshell: this runs for thousands of modules).
modname() { REPLY=${1##*/}; REPLY=${REPLY%%.ko*}; REPLY=${REPLY//-/_}; }
while IFS= read -r line; do
    modname "${line%%:*}"
    MOD_PATH[$REPLY]=${line%%:*}
    MOD_DEPS[$REPLY]=${line#*:}
done <"$MODDIR/modules.dep"
while IFS= read -r path; do
    modname "$path"
    BUILTIN[$REPLY]=1
done <"$MODDIR/modules.builtin"

# Depth-first post-order over modules.dep gives dependencies before their users.
declare -A STATE=()
ORDER=()
visit() {
    local m=$1 d i
    local -a deps
    case ${STATE[$m]:-} in
        visited) return ;;
        active) die "module dependency cycle through $m" ;;
    esac
    STATE[$m]=active
    read -ra deps <<<"${MOD_DEPS[$m]}"
    # modules.dep lists dependencies so that the last one loads first (as modprobe does).
    for ((i = ${#deps[@]} - 1; i >= 0; i--)); do
        modname "${deps[i]}"; d=$REPLY
        [[ -n ${MOD_PATH[$d]:-} ]] || die "module $m depends on $d, which is not in the package"
        visit "$d"
    done
    STATE[$m]=visited
    ORDER+=("$m")
}

read_list() {
    local m
    while IFS= read -r m; do
        m=${m%%#*}; m=${m//[[:space:]]/}; m=${m//-/_}
        [[ -z $m ]] && continue
        if [[ -n ${MOD_PATH[$m]:-} ]]; then
            visit "$m"
        elif [[ -n ${BUILTIN[$m]:-} ]]; then
            note "module $m is built into $KREL; nothing to load"
        else
            die "module $m ($1) is neither built into $KREL nor shipped as a module"
        fi
    done <"$1"
}
read_list "$MODULES_TXT"
# Modules only boxes with volumes load (at Configure): in the initramfs, not in the boot list.
BOOT_COUNT=${#ORDER[@]}
read_list "$GUEST_DIR/modules-volumes.txt"

# --- stage the initramfs tree --------------------------------------------------------------
STAGE="$WORK/initramfs"
mkdir -p "$STAGE"/{dev,proc,sys,run,tmp,rootfs,etc/boxlite,lib/modules}
chmod 1777 "$STAGE/tmp"
install -m 0755 "$AGENT" "$STAGE/init"

# The kernel checks a module's appended PKCS#7 signature at load time (without enforcing it):
# RSA under a software CPU costs ~5 ms a module. The pinned .deb's sha256 and the bundle
# manifest already vouch for these files, so the signatures are dropped.
strip_signature() {
    python3 - "$1" <<'PY'
import struct, sys
path = sys.argv[1]
magic = b"~Module signature appended~\n"
data = open(path, "rb").read()
if data.endswith(magic):
    (sig_len,) = struct.unpack(">I", data[-len(magic) - 4 : -len(magic)])
    open(path, "wb").write(data[: -len(magic) - 12 - sig_len])
PY
}

MOD_FILES=()
for m in "${ORDER[@]}"; do
    src="$MODDIR/${MOD_PATH[$m]}"
    base=${src##*/}
    dst="$STAGE/lib/modules/${base%%.ko*}.ko"
    [[ ! -e $dst ]] || die "two modules would both be lib/modules/${dst##*/}"
    # finit_module only takes compressed modules with CONFIG_MODULE_DECOMPRESS and the
    # MODULE_INIT_COMPRESSED_FILE flag; decompressing here keeps the agent simple.
    case $src in
        *.ko) cp "$src" "$dst" ;;
        *.ko.xz) xz -dc "$src" >"$dst" ;;
        *.ko.zst) zstd -qdc "$src" >"$dst" ;;
        *.ko.gz) gzip -dc "$src" >"$dst" ;;
        *) die "unknown module file type: $src" ;;
    esac
    strip_signature "$dst"
    chmod 0644 "$dst"
    MOD_FILES+=("${dst##*/}")
done
printf '%s\n' "${MOD_FILES[@]:0:BOOT_COUNT}" >"$STAGE/etc/boxlite/modules"
printf '%s\n' "${MOD_FILES[@]:BOOT_COUNT}" >"$STAGE/etc/boxlite/modules-volumes"
chmod 0644 "$STAGE/etc/boxlite/modules" "$STAGE/etc/boxlite/modules-volumes"

# Fixed timestamps last, after every directory has been written to.
find "$STAGE" -exec touch -h -d @0 {} +

# newc entry written by hand, so that /dev/console exists without mknod (i.e. root)
# at build time: the kernel opens it for /init's stdin/stdout/stderr before /init runs.
newc_entry() { # NAME MODE NLINK RDEVMAJOR RDEVMINOR
    local name=$1 namesize=$((${#1} + 1)) pad
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        0 "$2" 0 0 "$3" 0 0 0 0 "$4" "$5" "$namesize" 0
    printf '%s\0' "$name"
    pad=$(((4 - (110 + namesize) % 4) % 4))
    head -c "$pad" /dev/zero
}

CPIO="$WORK/initramfs.cpio"
{
    (cd "$STAGE" && find . -mindepth 1 -printf '%P\n' | sort |
        cpio --quiet --reproducible -o -H newc -R 0:0)
    # The kernel unpacks concatenated archives in order, so dev/ already exists here.
    newc_entry dev/console $((8#020600)) 1 5 1
    newc_entry 'TRAILER!!!' 0 1 0 0
} >"$CPIO.raw"

case $COMPRESSION in
    none) mv "$CPIO.raw" "$CPIO" ;;
    gzip) gzip -9 -n -c "$CPIO.raw" >"$CPIO" ;;
    lz4) lz4 -q -l -9 -c "$CPIO.raw" >"$CPIO" ;; # -l: the legacy frame the kernel reads
    *) die "BOXLITE_INITRAMFS_COMPRESSION must be none, gzip or lz4 (got $COMPRESSION)" ;;
esac

# --- outputs -------------------------------------------------------------------------------
sha() { sha256sum "$1" | cut -d' ' -f1; }
json_list() { local s='' x; for x in "$@"; do s+="${s:+, }\"$x\""; done; printf '[%s]' "$s"; }
for f in "${MOD_FILES[@]}"; do
    [[ $f =~ ^[A-Za-z0-9_.-]+$ ]] || die "unexpected module file name: $f"
done

cp "$VMLINUZ_SRC" "$WORK/vmlinuz"
cat >"$WORK/manifest.json" <<EOF
{
  "format_version": $FORMAT_VERSION,
  "kernel": {
    "package": "$PKG",
    "version": "$VER",
    "deb_sha256": "$SHA",
    "release": "$KREL"
  },
  "vmlinuz": {"sha256": "$(sha "$WORK/vmlinuz")", "size": $(stat -c %s "$WORK/vmlinuz")},
  "initramfs": {
    "file": "initramfs.cpio",
    "format": "newc",
    "compression": "$COMPRESSION",
    "sha256": "$(sha "$CPIO")",
    "size": $(stat -c %s "$CPIO")
  },
  "agent": {"sha256": "$(sha "$AGENT")", "size": $(stat -c %s "$AGENT")},
  "modules": $(json_list "${MOD_FILES[@]}"),
  "cmdline": "$RECOMMENDED_CMDLINE"
}
EOF

# Replace the outputs only once all of them exist, so that a failed build leaves
# either the old bundle or none, never a mix.
mkdir -p "$OUT_DIR"
for f in vmlinuz initramfs.cpio manifest.json; do
    cp "$WORK/$f" "$OUT_DIR/.$f.new"
done
for f in vmlinuz initramfs.cpio manifest.json; do
    mv -f "$OUT_DIR/.$f.new" "$OUT_DIR/$f"
done
note "built $OUT_DIR ($KREL, ${#MOD_FILES[@]} modules, initramfs $(stat -c %s "$OUT_DIR/initramfs.cpio") bytes, $COMPRESSION)"
