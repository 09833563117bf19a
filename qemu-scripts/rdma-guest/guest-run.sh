#!/bin/sh
# Runs INSIDE the soft-RoCE guest (started by its /init, read from the read-only project
# share): creates the soft-RoCE device rxe0 on lo, then runs /share/cmd.sh (written by
# run.py on the host) in /project with the guest's python3, tees its output to
# /share/output.log, writes its exit code to /share/rc, prints "RDMA-GUEST-EXIT <rc>" and
# powers the guest off.
#
# Environment of the command: QMPSHADOW_NO_EXTENSIONS=1 (the host's compiled twins are
# built for the host's Python), QMPSHADOW_IN_RDMA_GUEST=1 (tests/rdma/guest is collected
# only then), PYTHONPATH=/project, PYTHONDONTWRITEBYTECODE=1 (the share is read-only),
# plus the KEY=VALUE lines of /share/env.

diagnose() {
    echo "--- lsmod"; cat /proc/modules | cut -d' ' -f1 | tr '\n' ' '; echo
    echo "--- dmesg (tail)"; dmesg | tail -n 20
}

finish() {
    [ "$1" = 125 ] && diagnose
    echo "$1" >/share/rc
    echo "RDMA-GUEST-EXIT $1"
    sync
    echo o >/proc/sysrq-trigger
    sleep 10
}

t0=$(cut -d' ' -f1 /proc/uptime)
modprobe crc32_pclmul 2>/dev/null  # rxe's ICRC: the carry-less multiply version, not the table
if ! modprobe rdma_rxe; then
    echo "rdma-guest: modprobe rdma_rxe failed"
    finish 125
fi
modprobe ib_uverbs 2>/dev/null
ip link set lo up
if ! rdma link add rxe0 type rxe netdev lo; then
    echo "rdma-guest: rdma link add rxe0 type rxe netdev lo failed"
    finish 125
fi
state=
i=0
while [ $i -lt 100 ]; do
    state=$(cat /sys/class/infiniband/rxe0/ports/1/state 2>/dev/null)
    case "$state" in *ACTIVE*) break ;; esac
    i=$((i + 1))
    sleep 0.05
done
case "$state" in
    *ACTIVE*) ;;
    *) echo "rdma-guest: rxe0 port 1 is '$state', expected ACTIVE"; finish 125 ;;
esac
echo "RDMA-GUEST ready kernel=$(uname -r) cpus=$(nproc) mem_kib=$(awk '/MemTotal/ {print $2}' /proc/meminfo) rxe0=$state boot_s=$t0"

cd /project || finish 125
export HOME=/tmp TMPDIR=/tmp LANG=C.UTF-8
export QMPSHADOW_NO_EXTENSIONS=1 QMPSHADOW_IN_RDMA_GUEST=1
export PYTHONPATH=/project PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
if [ -f /share/env ]; then
    while IFS= read -r kv; do
        case "$kv" in *=*) export "$kv" ;; esac
    done </share/env
fi
if [ ! -f /share/cmd.sh ]; then
    echo "rdma-guest: /share/cmd.sh missing: nothing to run"
    finish 125
fi
{ /bin/sh /share/cmd.sh; echo $? >/tmp/cmd.rc; } 2>&1 | tee /share/output.log
finish "$(cat /tmp/cmd.rc 2>/dev/null || echo 125)"
