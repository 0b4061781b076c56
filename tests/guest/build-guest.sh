#!/usr/bin/env bash
# Fetches and assembles everything the end-to-end guest tests (tests/tests/guest.rs) boot:
#
#   - QEMU (qemu-system-x86 of the same version as the installed qemu-utils), unpacked with
#     `dpkg -x` into the cache, never installed: installing Debian's qemu-system-x86 would
#     replace the qemu-utils / qemu-storage-daemon build the other tests use. Libraries it needs
#     that the host lacks are unpacked beside it; a wrapper script sets LD_LIBRARY_PATH,
#     QEMU_MODULE_DIR (Debian builds some accelerators and devices as loadable modules) and
#     the firmware path (-L).
#   - the Debian kernel (linux-image-amd64) and the modules the guest needs (virtio_pci,
#     virtio_blk, ext4, crc32c and what they depend on, read from each module's .modinfo);
#   - an initramfs: busybox-static, fio and e2fsprogs with their shared libraries (found with
#     ldd) and the dynamic loader, the kernel modules, and tests/guest/guest-init.sh as /init.
#
# Everything comes from Debian packages through apt-get (a private apt state in the cache, so
# the host's apt configuration is not touched; bookworm-backports is added there because the
# host's qemu-utils comes from it). Nothing is installed on the host.
#
# Usage: tests/guest/build-guest.sh
#   QCOW2D_CACHE           cache folder (default: <repo>/.cache/guest)
#   QCOW2D_GUEST_REFRESH=1 refresh the package lists and re-check every component
#   QCOW2D_QEMU_VERSION    qemu-system-x86 version to fetch (default: the installed qemu-utils's)
#   QCOW2D_DEBIAN_MIRROR   mirror for the backports suite (default: http://deb.debian.org/debian)
#
# On success the last line printed is `GUEST-ENV <cache>/guest.env`; that file holds
# KEY=VALUE lines: QEMU (the wrapper), KERNEL, INITRD, QEMU_VERSION, KERNEL_VERSION.
# Idempotent: each component has a stamp and is rebuilt only when its inputs change.
set -Eeuo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${QCOW2D_CACHE:-$REPO/.cache/guest}
MIRROR=${QCOW2D_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Bump when the way a component is built changes, to rebuild it in existing caches.
RECIPE=3

say() { echo "build-guest: $*"; }
die() {
    echo "build-guest: ERROR: $*" >&2
    echo "build-guest: FAILED (cache: $CACHE)" >&2
    exit 1
}
trap 'die "command failed (line $LINENO): $BASH_COMMAND"' ERR

[ "$(uname -m)" = x86_64 ] || die "only x86_64 hosts are supported (this is $(uname -m))"
for tool in apt-get apt-cache dpkg dpkg-deb dpkg-query ldd gzip sha256sum awk find; do
    command -v "$tool" >/dev/null || die "host tool '$tool' is missing (this script needs a Debian host)"
done
# shellcheck disable=SC1091
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[ -n "$codename" ] || die "cannot tell the Debian release from /etc/os-release"

mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
# One build at a time per cache (test binaries and people may run this concurrently).
exec 9>"$CACHE/.lock"
if ! flock -n 9; then
    say "another build-guest.sh holds $CACHE/.lock; waiting for it"
    flock 9
fi

# ---------------------------------------------------------------------------------------------
# Private apt state: the host's sources plus <codename>-backports, lists and downloads in the
# cache.
# ---------------------------------------------------------------------------------------------
APT=$CACHE/apt
mkdir -p "$APT/sources.list.d" "$APT/lists/partial" "$APT/cache/archives/partial" "$CACHE/debs"
apt_opts=(
    -o "Dir::Etc::SourceList=$APT/sources.list"
    -o "Dir::Etc::SourceParts=$APT/sources.list.d"
    -o "Dir::State::Lists=$APT/lists"
    -o "Dir::Cache=$APT/cache"
    -o "APT::Sandbox::User=root"
    -o "Acquire::Retries=3"
)
write_sources() {
    rm -f "$APT/sources.list.d/"*
    : >"$APT/sources.list"
    if [ -f /etc/apt/sources.list ]; then cp /etc/apt/sources.list "$APT/sources.list"; fi
    local f
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        if [ -f "$f" ]; then cp "$f" "$APT/sources.list.d/"; fi
    done
    echo "deb $MIRROR $codename-backports main" >"$APT/sources.list.d/zz-qcow2d-backports.list"
}
lists_ready=0
apt_update() {
    say "refreshing the private package lists (apt-get update in $APT)"
    write_sources
    local out
    out=$(apt-get "${apt_opts[@]}" -q update 2>&1) || {
        echo "$out"
        die "apt-get update failed: the Debian mirrors cannot be reached (see above)"
    }
    echo "$out"
    # apt-get update exits 0 when some sources failed and old lists (or none) are used.
    if echo "$out" | grep -Eq '^(W|E): (Failed to fetch|Some index files failed)'; then
        die "apt-get update could not fetch every package list (see above): the Debian mirrors are not all reachable"
    fi
    lists_ready=1
}
acache() { apt-cache "${apt_opts[@]}" "$@"; }
if [ "${QCOW2D_GUEST_REFRESH:-0}" = 1 ] || ! compgen -G "$APT/lists/*_Packages*" >/dev/null; then
    apt_update
fi

# Highest version of PKG the lists know (empty if none).
highest_version() { acache madison "$1" 2>/dev/null | awk -F'|' 'NR==1 {gsub(/ /,"",$2); print $2}'; }
# apt's candidate version of PKG (empty if none).
candidate_version() { acache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2; exit}' | grep -v '(none)' || true; }

# Downloads PKG=VERSION... into $CACHE/debs (kept: a rebuild does not fetch them again), one
# apt-get call for all that are missing. apt-get download names a file PKG_VERSION_ARCH.deb
# with ':' spelt '%3a'.
deb_path() { compgen -G "$CACHE/debs/${1}_${2//:/%3a}_*.deb" | head -n1 || true; }
fetch_debs() {
    local item missing=()
    for item in "$@"; do
        if [ -z "$(deb_path "${item%%=*}" "${item#*=}")" ]; then missing+=("$item"); fi
    done
    ((${#missing[@]})) || return 0
    say "downloading ${missing[*]}"
    if ! (cd "$CACHE/debs" && apt-get "${apt_opts[@]}" -q download "${missing[@]}"); then
        [ "$lists_ready" = 0 ] || die "cannot download ${missing[*]} from the Debian mirrors"
        apt_update
        (cd "$CACHE/debs" && apt-get "${apt_opts[@]}" -q download "${missing[@]}") ||
            die "cannot download ${missing[*]} from the Debian mirrors"
    fi
    for item in "${missing[@]}"; do
        [ -n "$(deb_path "${item%%=*}" "${item#*=}")" ] ||
            die "apt-get download $item left no .deb in $CACHE/debs"
    done
}

# "PKG CANDIDATE" for each PKG (CANDIDATE is "(none)" for a virtual package).
candidates() {
    acache policy "$@" 2>/dev/null | awk '/^[^ ].*:$/ {p = substr($0, 1, length($0) - 1)}
        /^  Candidate:/ {print p, $2}'
}

# The library packages that the PKG=VER records depend on (Depends and Pre-Depends; the first
# alternative of each group; only lib* and zlib1g: executables and scripts that the guest does
# not need, python3 for fio's helpers say, are left out).
lib_deps() {
    acache show "$@" 2>/dev/null | awk '
        /^(Depends|Pre-Depends):/ {
            sub(/^[A-Za-z-]+: /, "")
            n = split($0, groups, ",")
            for (i = 1; i <= n; i++) {
                g = groups[i]; sub(/\|.*/, "", g); sub(/\(.*/, "", g); sub(/:any/, "", g)
                gsub(/[ \t]/, "", g)
                if (g ~ /^(lib|zlib1g)/) print g
            }
        }' | sort -u
}

# fetch_closure DEST SKIP_INSTALLED PKG[=VER]...: unpacks the packages and, recursively, the
# library packages they depend on into DEST (apt's candidate versions). libc6 always comes from
# the host (ldd runs the host's dynamic loader, which must match its libc). With
# SKIP_INSTALLED=1 libraries installed on the host are left out too (QEMU runs on the host and
# uses them). Writes one "pkg=version" line per unpacked package to DEST.pkgs.
fetch_closure() {
    local dest=$1 skip_installed=$2
    shift 2
    local -A seen=()
    local level=("$@") item pkg ver prov
    : >"$dest.pkgs"
    while ((${#level[@]})); do
        local need=() resolved=() next=()
        for item in "${level[@]}"; do
            pkg=${item%%=*}
            if [ -n "${seen[$pkg]:-}" ]; then continue; fi
            seen[$pkg]=1
            if [ "$item" != "$pkg" ]; then
                resolved+=("$item")
            elif [ "$pkg" = libc6 ]; then
                continue
            elif [ "$skip_installed" = 1 ] &&
                dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
                continue
            else
                need+=("$pkg")
            fi
        done
        if ((${#need[@]})); then
            local -A cand=()
            while read -r pkg ver; do cand[$pkg]=$ver; done < <(candidates "${need[@]}")
            for pkg in "${need[@]}"; do
                ver=${cand[$pkg]:-}
                [ -n "$ver" ] || die "no package $pkg in the Debian lists (needed by the guest)"
                if [ "$ver" = "(none)" ]; then
                    # A virtual package: take its first provider.
                    prov=$(acache showpkg "$pkg" 2>/dev/null |
                        awk '/^Reverse Provides:/ {f=1; next} f && NF {print $1; exit}')
                    [ -n "$prov" ] || die "nothing provides $pkg in the Debian lists"
                    next+=("$prov")
                else
                    resolved+=("$pkg=$ver")
                fi
            done
            unset cand
        fi
        if ((${#resolved[@]})); then
            fetch_debs "${resolved[@]}"
            for item in "${resolved[@]}"; do
                dpkg -x "$(deb_path "${item%%=*}" "${item#*=}")" "$dest" || die "dpkg -x of $item failed"
                echo "$item" >>"$dest.pkgs"
            done
            rm -rf "$dest/usr/share/doc" "$dest/usr/share/man" "$dest/usr/share/locale"
            while read -r pkg; do
                if [ -z "${seen[$pkg]:-}" ]; then next+=("$pkg"); fi
            done < <(lib_deps "${resolved[@]}")
        fi
        level=("${next[@]}")
    done
}

# Directories of DEST that hold shared libraries, as a colon-separated list.
lib_path() {
    find "$1" \( -name '*.so' -o -name '*.so.*' \) \( -type f -o -type l \) -printf '%h\n' |
        sort -u | paste -sd: -
}

stamp_ok() { [ -f "$1/.stamp" ] && [ "$(cat "$1/.stamp")" = "$2" ]; }

# ---------------------------------------------------------------------------------------------
# QEMU
# ---------------------------------------------------------------------------------------------
qemu_version=${QCOW2D_QEMU_VERSION:-$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)}
if [ -z "$qemu_version" ]; then
    qemu_version=$(highest_version qemu-system-x86)
    [ -n "$qemu_version" ] || die "no qemu-system-x86 in the Debian lists"
    say "qemu-utils is not installed; using the newest qemu-system-x86, $qemu_version"
elif [ -z "${QCOW2D_QEMU_VERSION:-}" ] && ! stamp_ok "$CACHE/qemu" "recipe=$RECIPE qemu=$qemu_version" &&
    ! acache madison qemu-system-x86 | awk -F'|' '{gsub(/ /, "", $2); print $2}' | grep -qxF "$qemu_version"; then
    # The mirrors dropped the installed qemu-utils's version (backports keeps only the newest).
    # The unpacked QEMU shares no library with qemu-utils, so a newer one works as well.
    newest=$(highest_version qemu-system-x86)
    [ -n "$newest" ] || die "no qemu-system-x86 in the Debian lists"
    say "WARNING: qemu-system-x86 $qemu_version (the installed qemu-utils's version) is no longer on the mirrors; using $newest"
    qemu_version=$newest
fi
QEMU_DIR=$CACHE/qemu
qemu_key="recipe=$RECIPE qemu=$qemu_version"
if stamp_ok "$QEMU_DIR" "$qemu_key"; then
    say "QEMU $qemu_version: cached in $QEMU_DIR"
else
    say "QEMU $qemu_version: fetching qemu-system-x86 and what it needs into $QEMU_DIR"
    rm -rf "$QEMU_DIR" "$QEMU_DIR.tmp"
    mkdir -p "$QEMU_DIR.tmp/root"
    # seabios: the one the qemu version asks for may only be in backports: take the newest.
    seabios_version=$(highest_version seabios)
    [ -n "$seabios_version" ] || die "no seabios in the Debian lists"
    fetch_closure "$QEMU_DIR.tmp/root" 1 \
        "qemu-system-x86=$qemu_version" "qemu-system-common=$qemu_version" \
        "qemu-system-data=$qemu_version" "seabios=$seabios_version"
    mv "$QEMU_DIR.tmp/root.pkgs" "$QEMU_DIR.tmp/packages"
    root=$QEMU_DIR.tmp/root
    bin=$root/usr/bin/qemu-system-x86_64
    [ -x "$bin" ] || die "qemu-system-x86 has no usr/bin/qemu-system-x86_64"
    # Debian builds some accelerators and devices as loadable modules: QEMU_MODULE_DIR points
    # at the unpacked ones (without it QEMU looks in /usr/lib/..., which is not there).
    moddir=$(find "$root" -type d -path '*/x86_64-linux-gnu/qemu' | head -n1)
    [ -n "$moddir" ] || die "qemu-system-x86 has no module folder (usr/lib/x86_64-linux-gnu/qemu)"
    libpath=$(lib_path "$root")
    missing_libs=$(for f in "$bin" "$moddir"/accel-*.so; do
        if [ -f "$f" ]; then LD_LIBRARY_PATH=$libpath ldd "$f" || die "ldd $f failed"; fi
    done | awk '/not found/ {print $1}' | sort -u)
    [ -z "$missing_libs" ] || die "QEMU needs libraries that no fetched package provides: $missing_libs"
    # The wrapper the tests run. Paths are resolved at run time from the wrapper's location, so
    # the cache can move.
    mkdir -p "$QEMU_DIR.tmp/bin"
    rel_libpath=$(echo "$libpath" | tr ':' '\n' | sed "s|^$root|\$root|" | paste -sd: -)
    rel_moddir=${moddir#"$root"}
    cat >"$QEMU_DIR.tmp/bin/qemu-system-x86_64" <<EOF
#!/bin/sh
# Generated by tests/guest/build-guest.sh: runs the unpacked qemu-system-x86 $qemu_version.
root=\$(cd "\$(dirname "\$0")/../root" && pwd)
export LD_LIBRARY_PATH="$rel_libpath\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export QEMU_MODULE_DIR="\$root$rel_moddir"
exec "\$root/usr/bin/qemu-system-x86_64" -L "\$root/usr/share/qemu" -L "\$root/usr/share/seabios" "\$@"
EOF
    chmod +x "$QEMU_DIR.tmp/bin/qemu-system-x86_64"
    mv "$QEMU_DIR.tmp" "$QEMU_DIR"
    out=$("$QEMU_DIR/bin/qemu-system-x86_64" -accel help 2>&1) ||
        die "the unpacked QEMU does not run: $out"
    echo "$out" | grep -qx tcg ||
        die "the unpacked QEMU offers no TCG accelerator (accel-tcg-x86_64.so module missing?): $out"
    echo "$qemu_key" >"$QEMU_DIR/.stamp"
    say "QEMU ready: $("$QEMU_DIR/bin/qemu-system-x86_64" --version | head -n1)"
fi

# ---------------------------------------------------------------------------------------------
# Kernel and modules
# ---------------------------------------------------------------------------------------------
kernel_pkg=$(acache show "linux-image-amd64=$(candidate_version linux-image-amd64)" 2>/dev/null |
    awk '/^Depends:/ { sub(/^Depends: /, ""); split($0, a, /[ ,(]/); print a[1]; exit }')
[ -n "$kernel_pkg" ] || die "cannot resolve linux-image-amd64 to a kernel package"
kernel_version=$(candidate_version "$kernel_pkg")
KERNEL_DIR=$CACHE/kernel
# The kernel modules the guest loads (their dependencies are found and loaded too).
MODULES=(virtio_pci virtio_blk ext4 crc32c_generic)
kernel_key="recipe=$RECIPE kernel=$kernel_pkg=$kernel_version modules=${MODULES[*]}"
if stamp_ok "$KERNEL_DIR" "$kernel_key"; then
    say "kernel $kernel_pkg $kernel_version: cached in $KERNEL_DIR"
else
    say "kernel $kernel_pkg $kernel_version: fetching into $KERNEL_DIR"
    rm -rf "$KERNEL_DIR" "$KERNEL_DIR.tmp"
    mkdir -p "$KERNEL_DIR.tmp"
    fetch_debs "$kernel_pkg=$kernel_version"
    deb=$(deb_path "$kernel_pkg" "$kernel_version")
    say "unpacking $(basename "$deb")"
    dpkg -x "$deb" "$KERNEL_DIR.tmp/root"
    vmlinuz=$(find "$KERNEL_DIR.tmp/root/boot" -name 'vmlinuz-*' | head -n1)
    [ -f "$vmlinuz" ] || die "$kernel_pkg has no boot/vmlinuz-*"
    kver=${vmlinuz##*/vmlinuz-}
    [ -d "$KERNEL_DIR.tmp/root/lib/modules/$kver/kernel" ] || die "$kernel_pkg has no lib/modules/$kver/kernel"
    cp "$vmlinuz" "$KERNEL_DIR.tmp/vmlinuz"
    echo "$kver" >"$KERNEL_DIR.tmp/release"
    MODDIR=$KERNEL_DIR.tmp/root/lib/modules/$kver
    OUT=$KERNEL_DIR.tmp/modules
    mkdir -p "$OUT"
    # Keep only the modules the guest loads: MODULES and what they depend on, in load order.
    # The package has no modules.dep (depmod makes it at install time, and the host may have
    # no kmod): each module's dependencies are read from its .modinfo strings ("depends=a,b").
    : >"$OUT/load-order"
    declare -A mod_done=()
    add_module() {
        local name=$1 file dep
        [ -z "${mod_done[$name]:-}" ] || return 0
        mod_done[$name]=1
        file=$(find "$MODDIR/kernel" \( -name "$name.ko*" -o -name "${name//_/-}.ko*" \) | head -n1)
        if [ -z "$file" ]; then
            if grep -Eq "/${name//_/[_-]}\.ko" "$MODDIR/modules.builtin" 2>/dev/null; then
                say "module $name is built into the kernel"
                return 0
            fi
            die "kernel $kver has no module $name (neither a .ko nor built in)"
        fi
        local base=${file##*/} ko
        case $base in
        *.ko) ko=$base; cp "$file" "$OUT/$ko" ;;
        *.ko.xz) ko=${base%.xz}; xz -dc "$file" >"$OUT/$ko" ;;
        *.ko.zst) ko=${base%.zst}; zstd -qdc "$file" >"$OUT/$ko" ;;
        *.ko.gz) ko=${base%.gz}; gzip -dc "$file" >"$OUT/$ko" ;;
        *) die "unknown module file type: $file" ;;
        esac
        for dep in $(tr '\0' '\n' <"$OUT/$ko" | sed -n 's/^depends=//p' | head -n1 | tr ',' ' '); do
            add_module "${dep//-/_}"
        done
        echo "$ko" >>"$OUT/load-order"
    }
    for m in "${MODULES[@]}"; do add_module "$m"; done
    say "modules: $(tr '\n' ' ' <"$OUT/load-order")"
    rm -rf "$KERNEL_DIR.tmp/root"
    mv "$KERNEL_DIR.tmp" "$KERNEL_DIR"
    echo "$kernel_key" >"$KERNEL_DIR/.stamp"
fi
kver=$(cat "$KERNEL_DIR/release")

# ---------------------------------------------------------------------------------------------
# Guest userland: busybox-static, fio, e2fsprogs and their libraries
# ---------------------------------------------------------------------------------------------
USER_DIR=$CACHE/userland
user_top=(busybox-static fio e2fsprogs)
user_versions=""
while read -r p v; do
    [ "$v" != "(none)" ] || die "no $p in the Debian lists"
    user_versions+=" $p=$v"
done < <(candidates "${user_top[@]}")
[ "$(echo "$user_versions" | wc -w)" = "${#user_top[@]}" ] ||
    die "the Debian lists lack one of ${user_top[*]} (found:$user_versions)"
user_key="recipe=$RECIPE libc=$(dpkg-query -W -f='${Version}' libc6)$user_versions"
if stamp_ok "$USER_DIR" "$user_key"; then
    say "guest userland:$user_versions: cached in $USER_DIR"
else
    say "guest userland:$user_versions: fetching into $USER_DIR"
    rm -rf "$USER_DIR" "$USER_DIR.tmp"
    mkdir -p "$USER_DIR.tmp/root"
    # shellcheck disable=SC2086
    fetch_closure "$USER_DIR.tmp/root" 0 $user_versions
    mv "$USER_DIR.tmp/root.pkgs" "$USER_DIR.tmp/packages"
    mv "$USER_DIR.tmp" "$USER_DIR"
    echo "$user_key" >"$USER_DIR/.stamp"
fi

# ---------------------------------------------------------------------------------------------
# Initramfs
# ---------------------------------------------------------------------------------------------
INITRD_DIR=$CACHE/initramfs
init_key="recipe=$RECIPE kernel=[$kernel_key] userland=[$user_key] init=$(sha256sum "$HERE/guest-init.sh" | cut -c1-16) script=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"
if stamp_ok "$INITRD_DIR" "$init_key"; then
    say "initramfs: cached in $INITRD_DIR"
else
    say "initramfs: building in $INITRD_DIR"
    rm -rf "$INITRD_DIR" "$INITRD_DIR.tmp"
    R=$INITRD_DIR.tmp/root
    mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,mnt,run,lib/modules,lib64}
    U=$USER_DIR/root

    # busybox (static) and the applets as symlinks.
    cp "$U/bin/busybox" "$R/bin/busybox"
    "$R/bin/busybox" --list-full >"$INITRD_DIR.tmp/applets" ||
        die "the busybox from busybox-static does not run"
    while read -r a; do
        if [ ! -L "$R/$a" ] && [ ! -e "$R/$a" ]; then ln -s /bin/busybox "$R/$a"; fi
    done <"$INITRD_DIR.tmp/applets"
    for a in sh mount insmod sha256sum poweroff dd dmesg sync seq awk sed grep date; do
        grep -Eq "(^|/)$a\$" "$INITRD_DIR.tmp/applets" || die "busybox has no '$a' applet"
    done

    # fio and e2fsprogs, with every library ldd finds (from the unpacked packages first, else
    # the host's libc) copied to the same path in the guest, and the dynamic loader.
    libpath=$(lib_path "$U")
    copy_with_libs() {
        local src=$1 dst=$2 lib
        rm -f "$R$dst"
        cp -L "$src" "$R$dst"
        local out
        out=$(LD_LIBRARY_PATH=$libpath ldd "$src") || die "ldd $src failed: $out"
        if echo "$out" | grep -q 'not found'; then
            die "$src needs libraries no fetched package provides: $(echo "$out" | grep 'not found')"
        fi
        for lib in $(echo "$out" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
            local gpath=${lib#"$U"}
            gpath=${gpath/#\/usr\/lib\//\/lib\/}
            mkdir -p "$R$(dirname "$gpath")"
            [ -e "$R$gpath" ] || cp -L "$lib" "$R$gpath"
        done
    }
    copy_with_libs "$U/usr/bin/fio" /usr/bin/fio
    copy_with_libs "$U/sbin/mke2fs" /sbin/mke2fs
    copy_with_libs "$U/sbin/e2fsck" /sbin/e2fsck
    ln -sf mke2fs "$R/sbin/mkfs.ext4"
    cp "$U/etc/mke2fs.conf" "$R/etc/mke2fs.conf"
    [ -e "$R/lib64/ld-linux-x86-64.so.2" ] || cp -L /lib64/ld-linux-x86-64.so.2 "$R/lib64/"
    echo "/lib/x86_64-linux-gnu" >"$R/etc/ld.so.conf"
    # Merged /usr as on Debian: both spellings reach the libraries.
    mkdir -p "$R/usr"
    ln -s ../lib "$R/usr/lib"

    mkdir -p "$R/lib/modules"
    cp "$KERNEL_DIR/modules/"* "$R/lib/modules/"

    cp "$HERE/guest-init.sh" "$R/init"
    chmod 755 "$R/init"
    echo "$kver" >"$R/etc/kernel-release"
    cp "$USER_DIR/packages" "$R/etc/qcow2d-packages"

    (cd "$R" && find . -mindepth 1 | LC_ALL=C sort | "$R/bin/busybox" cpio -o -H newc 2>/dev/null) |
        gzip -6 >"$INITRD_DIR.tmp/initramfs.cpio.gz" || die "building the cpio archive failed"
    cp "$KERNEL_DIR/vmlinuz" "$INITRD_DIR.tmp/vmlinuz"
    rm -rf "$R"
    mv "$INITRD_DIR.tmp" "$INITRD_DIR"
    echo "$init_key" >"$INITRD_DIR/.stamp"
    say "initramfs: $(du -h "$INITRD_DIR/initramfs.cpio.gz" | cut -f1)"
fi

cat >"$CACHE/guest.env.tmp" <<EOF
QEMU=$QEMU_DIR/bin/qemu-system-x86_64
QEMU_VERSION=$qemu_version
KERNEL=$INITRD_DIR/vmlinuz
KERNEL_VERSION=$kver
INITRD=$INITRD_DIR/initramfs.cpio.gz
EOF
mv "$CACHE/guest.env.tmp" "$CACHE/guest.env"
say "ready: $(tr '\n' ' ' <"$CACHE/guest.env")"
echo "GUEST-ENV $CACHE/guest.env"
