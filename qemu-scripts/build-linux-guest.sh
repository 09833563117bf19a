#!/usr/bin/env bash
# Build qmpshadow's optional Linux test guest for TCG runs:
#   build/linux-guest/vmlinuz             the host's Debian kernel (package linux-image-amd64)
#   build/linux-guest/initramfs.cpio.gz   busybox-static + qemu-scripts/linux-guest/init
# Installs the Debian packages it needs when missing (as root; idempotent).
#
# Usage: qemu-scripts/build-linux-guest.sh [--no-install]
#   OUT=dir   output directory (default: <repo>/build/linux-guest)
#
# Boot it (see docs/test-guest.md):
#   qemu-system-x86_64 -machine pc -accel tcg -cpu qemu64 -m 256 -nographic -no-reboot \
#     -kernel build/linux-guest/vmlinuz -initrd build/linux-guest/initramfs.cpio.gz \
#     -append "console=ttyS0 panic=-1 lg.mib=4"
# and wait for the line "LINUXGUEST ready ...", then "COUNTER <n> mism=<m>" lines.
# Network modes (e1000 NIC; lg.ip=, lg.mode=tcpcount|serve): see qemu-scripts/linux-guest/init.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
OUT=${OUT:-$ROOT/build/linux-guest}
INSTALL=1
for arg in "$@"; do
    case "$arg" in
        --no-install) INSTALL=0 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "build-linux-guest.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
    esac
done

PACKAGES=(busybox-static linux-image-amd64 cpio gzip)
missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    if ((INSTALL == 0)) || [[ $(id -u) != 0 ]]; then
        echo "build-linux-guest.sh: missing Debian packages: ${missing[*]}" >&2
        echo "  install them with: apt-get install -y --no-install-recommends ${missing[*]}" >&2
        exit 3
    fi
    echo "build-linux-guest.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends "${missing[@]}"; then
        apt-get update
        apt-get install -y --no-install-recommends "${missing[@]}"
    fi
fi

BUSYBOX=/bin/busybox
[[ -x $BUSYBOX ]] || BUSYBOX=$(command -v busybox)
if ! "$BUSYBOX" true; then
    echo "build-linux-guest.sh: $BUSYBOX does not run" >&2
    exit 1
fi
if ldd "$BUSYBOX" >/dev/null 2>&1; then
    echo "build-linux-guest.sh: $BUSYBOX is dynamically linked; install busybox-static" >&2
    exit 1
fi

shopt -s nullglob
kernels=(/boot/vmlinuz-*)
shopt -u nullglob
if ((${#kernels[@]} == 0)); then
    echo "build-linux-guest.sh: no /boot/vmlinuz-* (install linux-image-amd64)" >&2
    exit 1
fi
KERNEL=$(printf '%s\n' "${kernels[@]}" | sort -V | tail -n 1)

mkdir -p "$OUT"
STAGE=$(mktemp -d "$OUT/.stage.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT

# initramfs tree
mkdir -p "$STAGE"/root/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,mnt,etc}
cp "$BUSYBOX" "$STAGE/root/bin/busybox"
ln -s busybox "$STAGE/root/bin/sh"
install -m 0755 "$HERE/linux-guest/init" "$STAGE/root/init"
# the e1000 NIC driver (a module in Debian's kernel, no dependencies) for lg.ip=
RELEASE=${KERNEL#/boot/vmlinuz-}
E1000=/lib/modules/$RELEASE/kernel/drivers/net/ethernet/intel/e1000/e1000.ko
if [[ -f $E1000 ]]; then
    mkdir -p "$STAGE/root/lib/modules"
    install -m 0644 "$E1000" "$STAGE/root/lib/modules/e1000.ko"
else
    echo "build-linux-guest.sh: warning: no $E1000, the guest will have no network" >&2
fi
if [[ $(id -u) == 0 ]]; then
    # so that the kernel can open the console before /init runs
    mknod -m 0600 "$STAGE/root/dev/console" c 5 1
    mknod -m 0666 "$STAGE/root/dev/null" c 1 3
fi
# fixed timestamps: the same inputs give the same archive
find "$STAGE/root" -exec touch -h -d @0 {} +
(cd "$STAGE/root" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
    cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) |
    gzip -9n >"$STAGE/initramfs.cpio.gz"

install -m 0644 "$KERNEL" "$STAGE/vmlinuz"
mv -f "$STAGE/initramfs.cpio.gz" "$OUT/initramfs.cpio.gz"
mv -f "$STAGE/vmlinuz" "$OUT/vmlinuz"
echo "${KERNEL#/boot/vmlinuz-}" >"$OUT/kernel-release"

echo "build-linux-guest.sh: kernel $KERNEL -> $OUT/vmlinuz"
echo "build-linux-guest.sh: initramfs -> $OUT/initramfs.cpio.gz ($(stat -c %s "$OUT/initramfs.cpio.gz") bytes)"
