# shellcheck shell=bash
# Helpers shared by guest/build.sh and guest/bump-kernel.sh (sourced, not run).

die() { echo "guest: error: $*" >&2; exit 1; }
note() { echo "guest: $*" >&2; }

# lock_get FILE KEY: value of KEY=value in FILE (comments and blank lines ignored).
lock_get() {
    local file=$1 key=$2 line
    while IFS= read -r line || [[ -n $line ]]; do
        [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
        if [[ ${line%%=*} == "$key" ]]; then
            printf '%s\n' "${line#*=}"
            return 0
        fi
    done <"$file"
    return 1
}

# A fresh container has no package lists at all; apt-cache then knows no package and
# apt-get download fails with "Unable to locate package". Refresh once in that case.
apt_lists_present() {
    compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null
}

apt_update_once() {
    [[ ${_BOXLITE_APT_UPDATED:-} == 1 ]] && return 0
    if [[ $(id -u) -ne 0 ]]; then
        note "apt package lists look stale or missing; run 'apt-get update' as root and retry"
        return 1
    fi
    note "running apt-get update"
    apt-get update -qq >&2 || return 1
    _BOXLITE_APT_UPDATED=1
}

# cloud_kernel_packages SERIES: signed cloud-amd64 kernel image packages of a series
# (6.1 -> linux-image-6.1.0-NN-cloud-amd64, 6.12 -> linux-image-6.12.NNN+deb12-cloud-amd64).
# The trailing anchor drops the -dbg and -unsigned variants and the meta-packages.
cloud_kernel_packages() {
    local series_re=${1//./\\.}
    apt-cache search --names-only "^linux-image-${series_re}[.-].*-cloud-amd64\$" | awk '{print $1}'
}

# newest_cloud_kernel SERIES: prints "PACKAGE VERSION" of the newest available one.
# Compares Debian package versions (dpkg order), not names: the ABI number in the
# name and the upstream version move together, but only the version is authoritative.
newest_cloud_kernel() {
    local series=$1 pkg ver best_pkg='' best_ver=''
    while read -r pkg; do
        while read -r ver; do
            [[ -z $ver ]] && continue
            if [[ -z $best_ver ]] || dpkg --compare-versions "$ver" gt "$best_ver"; then
                best_pkg=$pkg best_ver=$ver
            fi
        done < <(apt-cache madison "$pkg" | awk -F'|' '{gsub(/ /, "", $2); print $2}' | sort -u)
    done < <(cloud_kernel_packages "$series")
    [[ -n $best_pkg ]] || return 1
    printf '%s %s\n' "$best_pkg" "$best_ver"
}

# version_available PACKAGE VERSION
version_available() {
    apt-cache madison "$1" 2>/dev/null | awk -F'|' '{gsub(/ /, "", $2); print $2}' | grep -qxF -- "$2"
}

# apt_download PACKAGE VERSION DIR: downloads the .deb into DIR, prints its path.
apt_download() {
    local pkg=$1 ver=$2 dir=$3 opts=()
    # As root apt drops to the _apt user, which cannot write into a private temp dir.
    [[ $(id -u) -eq 0 ]] && opts=(-o APT::Sandbox::User=root)
    (cd "$dir" && apt-get download -qq "${opts[@]}" "$pkg=$ver" >&2) || return 1
    local debs=("$dir"/*.deb)
    [[ ${#debs[@]} -eq 1 && -f ${debs[0]} ]] || return 1
    printf '%s\n' "${debs[0]}"
}
