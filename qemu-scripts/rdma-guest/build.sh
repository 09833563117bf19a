#!/usr/bin/env bash
# Build the soft-RoCE test guest of qmpshadow's RDMA transport, once:
#   build/rdma-guest/vmlinux        the host's Debian kernel (package linux-image-amd64),
#                                   decompressed from /boot/vmlinuz-* so that QEMU boots it
#                                   through its PVH entry: ~4 s less per boot under TCG than
#                                   decompressing the bzImage in the guest
#   build/rdma-guest/rootfs.cpio    an UNCOMPRESSED initramfs: base.cpio (a minimal Debian
#                                   bookworm from debootstrap with python3, python3-pyverbs,
#                                   rdma-core, iproute2 and the project's Python dependencies,
#                                   trimmed) followed by overlay.cpio (/init and the kernel
#                                   modules: rdma_rxe, 9p over virtio and their dependencies)
#   build/rdma-guest/stamp          what the image was built from
# Each part is rebuilt only when its inputs changed (idempotent: ~0.1 s when nothing did);
# downloaded .debs and wheels stay in build/rdma-guest/cache/ (outside git).
#
# Installs the host packages it needs when missing (debootstrap, linux-image-amd64, cpio,
# kmod; as root, idempotent). Needs network access to deb.debian.org and PyPI the first time.
#
# Usage: qemu-scripts/rdma-guest/build.sh [--no-install] [--force]
#   OUT=dir       output directory (default: <repo>/build/rdma-guest)
#   MIRROR=url    Debian mirror (default: http://deb.debian.org/debian)
# Exit codes: 0 built or up to date; 3 a prerequisite is missing (message says which);
# anything else: the build failed.
#
# Boot it with qemu-scripts/rdma-guest/run.py (see docs/transport-rdma.md).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
OUT=${OUT:-$ROOT/build/rdma-guest}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
INSTALL=1
FORCE=0
for arg in "$@"; do
    case "$arg" in
        --no-install) INSTALL=0 ;;
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "rdma-guest/build.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
    esac
done
say() { echo "rdma-guest/build.sh: $*" >&2; }

# Guest packages. python3-cryptography is not listed: bookworm has 38, the project needs
# >= 42 (certs.py uses not_valid_after_utc); its wheel comes from PyPI below, with qemu.qmp
# (not packaged by Debian; pure Python).
GUEST_PACKAGES=(
    python3 python3-pyverbs rdma-core ibverbs-providers iproute2 kmod
    python3-xxhash python3-zstandard python3-cffi-backend
    python3-pytest python3-pytest-asyncio
)
WHEELS=("cryptography>=42" "cffi>=1.12" "pycparser" "qemu.qmp>=0.0.6")
MODULES=(rdma_rxe ib_uverbs crc32_generic crc32_pclmul 9p 9pnet_virtio virtio_pci dummy veth)
# Bump when the base recipe below changes in a way the lists above do not show.
BASE_RECIPE=2

# -- host prerequisites -------------------------------------------------------------------
HOST_PACKAGES=(debootstrap linux-image-amd64 cpio kmod)
missing=()
for pkg in "${HOST_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    if ((INSTALL == 0)) || [[ $(id -u) != 0 ]]; then
        say "missing Debian packages: ${missing[*]}"
        say "  install them with: apt-get install -y --no-install-recommends ${missing[*]}"
        exit 3
    fi
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi
if [[ $(id -u) != 0 ]]; then
    say "debootstrap needs root (run as root, or use a prebuilt $OUT)"
    exit 3
fi

shopt -s nullglob
kernels=(/boot/vmlinuz-*)
shopt -u nullglob
if ((${#kernels[@]} == 0)); then
    say "no /boot/vmlinuz-* (install linux-image-amd64)"
    exit 3
fi
KERNEL=$(printf '%s\n' "${kernels[@]}" | sort -V | tail -n 1)
KREL=${KERNEL#/boot/vmlinuz-}
if ! modprobe -S "$KREL" --show-depends rdma_rxe >/dev/null 2>&1; then
    say "kernel $KREL has no rdma_rxe module under /lib/modules/$KREL (Debian's linux-image-amd64 ships it)"
    exit 3
fi

PIP=("$ROOT/.venv/bin/python" -m pip)
[[ -x $ROOT/.venv/bin/python ]] || PIP=(python3 -m pip)

# -- what is up to date? ------------------------------------------------------------------
hash() { sha256sum | cut -d' ' -f1; }
base_key=$(printf '%s\n' "$BASE_RECIPE" "$MIRROR" "$SUITE" "${GUEST_PACKAGES[@]}" "${WHEELS[@]}" | hash)
overlay_key=$( { cat "$0" "$HERE/init"; printf '%s\n' "$KREL" "${MODULES[@]}"; sha256sum "$KERNEL"; } | hash)
key=$(printf '%s\n' "$base_key" "$overlay_key" | hash)
if ((FORCE == 0)) && [[ -f $OUT/stamp && -f $OUT/rootfs.cpio && -f $OUT/vmlinux ]] &&
    [[ $(head -n 1 "$OUT/stamp") == "$key" ]]; then
    say "up to date ($OUT, kernel $KREL)"
    exit 0
fi

t0=$(date +%s)
mkdir -p "$OUT/cache/debs" "$OUT/cache/wheels"
STAGE=$(mktemp -d "$OUT/.stage.XXXXXX")
cleanup() {
    # a failed debootstrap may leave proc/sys mounted in the tree
    for m in proc sys dev/pts dev; do
        if mountpoint -q "$STAGE/root/$m" 2>/dev/null; then umount -l "$STAGE/root/$m" || true; fi
    done
    rm -rf "$STAGE"
}
trap cleanup EXIT

pack() {  # pack DIR > archive: newc, sorted, owned by root
    (cd "$1" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
        cpio --null --create --format=newc --owner=0:0 --quiet)
}

# -- base: debootstrap + wheels, trimmed ---------------------------------------------------
if ((FORCE == 1)) || [[ ! -f $OUT/base.cpio || $(head -n 1 "$OUT/base.stamp" 2>/dev/null) != "$base_key" ]]; then
    R=$STAGE/root
    include=$(IFS=,; echo "${GUEST_PACKAGES[*]}")
    say "debootstrap $SUITE ($include) ..."
    if ! debootstrap --variant=minbase --include="$include" --cache-dir="$OUT/cache/debs" \
            "$SUITE" "$R" "$MIRROR" >"$STAGE/debootstrap.log" 2>&1; then
        tail -n 30 "$STAGE/debootstrap.log" >&2
        if [[ -f $R/debootstrap/debootstrap.log ]]; then
            tail -n 30 "$R/debootstrap/debootstrap.log" >&2
        fi
        if grep -qiE "Failed getting release file|Temporary failure|Could not resolve|unable to fetch|Connection refused" \
                "$STAGE/debootstrap.log"; then
            say "debootstrap could not reach $MIRROR (network?)"
            exit 3
        fi
        say "debootstrap failed"
        exit 1
    fi

    say "wheels: ${WHEELS[*]}"
    PY_SITE=$R/usr/local/lib/python3.11/dist-packages
    mkdir -p "$PY_SITE"
    if ! "${PIP[@]}" install -q --disable-pip-version-check --no-compile --only-binary=:all: \
            --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
            --platform manylinux_2_34_x86_64 --python-version 3.11 --implementation cp \
            --target "$PY_SITE" --cache-dir "$OUT/cache/wheels" "${WHEELS[@]}" 2>"$STAGE/pip.log"; then
        grep -v "^WARNING: Location" "$STAGE/pip.log" >&2 || true
        say "could not fetch wheels ${WHEELS[*]} from PyPI (network?)"
        exit 3
    fi
    find "$PY_SITE" -name '*.so' -exec strip --strip-unneeded {} + 2>/dev/null || true
    chroot "$R" python3 -m compileall -q /usr/local/lib/python3.11/dist-packages >/dev/null || true

    {
        echo "$base_key"
        chroot "$R" dpkg-query -W -f='${Package} ${Version}\n' |
            grep -E '^(python3|python3-pyverbs|rdma-core|ibverbs-providers|iproute2|python3-xxhash|python3-zstandard|python3-pytest|python3-pytest-asyncio) '
        ls "$PY_SITE" | grep -E '\.dist-info$'
    } >"$STAGE/base.stamp"

    say "trimming (documentation, locales, hwdb, perl, apt, dpkg database, unused stdlib)"
    rm -rf "$R"/usr/share/{doc,man,info,locale,i18n,lintian,linda,bug,zoneinfo,perl,perl5,common-licenses,bash-completion} \
        "$R"/usr/lib/udev/hwdb.d "$R"/usr/lib/udev/hwdb.bin "$R"/etc/udev/hwdb.bin \
        "$R"/usr/bin/perl* "$R"/usr/lib/x86_64-linux-gnu/perl* "$R"/usr/lib/x86_64-linux-gnu/gconv \
        "$R"/usr/bin/apt* "$R"/usr/lib/apt "$R"/usr/lib/x86_64-linux-gnu/libapt-* \
        "$R"/var/cache/* "$R"/var/lib/apt "$R"/var/lib/dpkg "$R"/var/log/* "$R"/etc/apt \
        "$R"/debootstrap "$R"/usr/bin/localedef "$R"/usr/lib/locale \
        "$R"/usr/lib/python3.11/{test,idlelib,tkinter,turtledemo,ensurepip,lib2to3,pydoc_data} \
        "$R"/usr/lib/python3.11/config-3.11-x86_64-linux-gnu
    mkdir -p "$R"/{project,share,proc,sys,dev,tmp,run}
    rm -f "$R/dev/console" "$R/dev/null"
    mknod -m 0600 "$R/dev/console" c 5 1
    mknod -m 0666 "$R/dev/null" c 1 3
    echo rdma-guest >"$R/etc/hostname"
    pack "$R" >"$STAGE/base.cpio"
    mv -f "$STAGE/base.cpio" "$OUT/base.cpio"
    mv -f "$STAGE/base.stamp" "$OUT/base.stamp"
    rm -rf "$R"
    say "base: $(( $(stat -c %s "$OUT/base.cpio") >> 20 )) MiB"
fi

# -- overlay: /init, kernel modules ---------------------------------------------------------
# The base has a merged /usr (/lib -> usr/lib): the overlay must not carry a /lib directory,
# or unpacking it replaces that symlink (and every library path with it).
O=$STAGE/overlay
mkdir -p "$O/usr/lib/modules/$KREL"
ln -s usr/lib "$O/lib"  # for depmod -b only
install -m 0755 "$HERE/init" "$O/init"
for m in "${MODULES[@]}"; do
    modprobe -S "$KREL" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
done | sort -u | while read -r ko; do
    install -D -m 0644 "$ko" "$O/usr/lib/modules/$KREL/${ko#/lib/modules/"$KREL"/}"
done
for f in modules.order modules.builtin modules.builtin.modinfo; do
    if [[ -f /lib/modules/$KREL/$f ]]; then cp "/lib/modules/$KREL/$f" "$O/usr/lib/modules/$KREL/"; fi
done
depmod -b "$O" "$KREL"
rm "$O/lib"
pack "$O" >"$STAGE/overlay.cpio"

# -- kernel: the bzImage's payload, for QEMU's PVH entry --------------------------------------
python3 - "$KERNEL" "$STAGE/vmlinux" <<'PY' || cp "$KERNEL" "$STAGE/vmlinux"
import lzma, sys
raw = open(sys.argv[1], "rb").read()
at = raw.find(b"\xfd7zXZ\x00")
if at < 0:
    sys.exit("rdma-guest/build.sh: no xz payload in the kernel image; booting the bzImage")
elf = lzma.LZMADecompressor().decompress(raw[at:])
if elf[:4] != b"\x7fELF":
    sys.exit("rdma-guest/build.sh: the kernel payload is not an ELF; booting the bzImage")
open(sys.argv[2], "wb").write(elf)
PY

cat "$OUT/base.cpio" "$STAGE/overlay.cpio" >"$STAGE/rootfs.cpio"
mv -f "$STAGE/rootfs.cpio" "$OUT/rootfs.cpio"
mv -f "$STAGE/vmlinux" "$OUT/vmlinux"
rm -f "$OUT/vmlinuz"
{
    echo "$key"
    echo "kernel $KREL ($KERNEL)"
    echo "built $(date -u +%FT%TZ)"
    tail -n +2 "$OUT/base.stamp"
} >"$OUT/stamp"
say "built $OUT/rootfs.cpio ($(( $(stat -c %s "$OUT/rootfs.cpio") >> 20 )) MiB) in $(( $(date +%s) - t0 )) s"
