"""Output commit across a failover, on real QEMU (TCG, shared-RAM source), real mosquitto,
the real CLI agents, and a real TCP peer in a private LAN (a network namespace).

The Linux test guest (qemu-scripts/build-linux-guest.sh) streams ``SEQ <n> <uptime>`` lines
over one TCP connection to the peer and prints ``COUNTER`` lines on its serial console. The
primary QEMU is killed (kill -9) mid-epoch (off: on its first serial line after a
checkpoint), so that it has said things after its last committed checkpoint; the shadow
promotes by itself. Then:

- ``output_commit = "on"``: the peer never saw a stream byte twice with two values (no
  contradiction, from a raw capture), the counters it read never repeat or go back, and the
  serial log (released by the source agent) followed by the promoted shadow's never shows a
  COUNTER twice;
- ``"off"``: the same run shows the duplicates — the promoted shadow prints COUNTER lines the
  primary had already printed (asserted); when the primary had also sent stream bytes after
  the checkpoint, the shadow re-sends them with other values (reported: Nagle often holds
  them back in that window, so this cannot be forced reliably).

Whether the TCP connection survives is reported (``stream_went_on``), not asserted.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from qmpshadow.cluster.mosquitto import Mosquitto
from qmpshadow.qemu.accel import AccelChoice
from qmpshadow.qemu.spec import VmSpec
from qmpshadow.qemu.testguest import parse_serial, repo_root
from qmpshadow.testing.lan import Lan
from qmpshadow.testing.netns import netns_unavailable_reason
from tests.faults.e2e import (
    Agent,
    assert_one_copy,
    cluster_args,
    kill_pid,
    kill_until_failover,
    shadow_agent,
    source_agent,
)
from tests.integration.conftest import LaunchVm

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
GUEST_IP = "10.77.0.2"
PORT = 5000
INTERVAL_MS = 500
GUEST_ARGS = f"console=ttyS0 panic=-1 lg.mib=1 lg.delay=0.1 lg.ip={GUEST_IP}/24"


def linux_guest() -> tuple[Path, Path]:
    """The Linux test guest, built (idempotently, ~1 s once its packages are in) if needed."""
    out = repo_root() / "build" / "linux-guest"
    kernel, initrd = out / "vmlinuz", out / "initramfs.cpio.gz"
    script = repo_root() / "qemu-scripts" / "build-linux-guest.sh"
    if not initrd.exists() or initrd.stat().st_mtime < max(
            script.stat().st_mtime, (script.parent / "linux-guest" / "init").stat().st_mtime):
        # its packages come with `make deps`; a test does not install them
        done = subprocess.run([str(script), "--no-install"], capture_output=True, text=True,
                              timeout=600, check=False)
        assert done.returncode == 0, f"{script} failed (run `make deps linux-guest`):\n" \
            f"{done.stderr[-1000:]}"
    return kernel, initrd


def write_net_spec(path: Path, mem_path: Path, *, output_commit: bool, tag: str,
                   mib: int = 128, kernel_args: str = "", nic_model: str = "e1000") -> Path:
    """The Linux guest with one e1000 NIC (taps qsp<tag>/qss<tag>; ``nic_model`` another
    of QEMU's e1000 models); by default it streams SEQ lines to the peer (``kernel_args``
    replaces that)."""
    kernel, initrd = linux_guest()
    kernel_args = kernel_args or f"{GUEST_ARGS} lg.mode=tcpcount lg.peer=10.77.0.1:{PORT}"
    path.write_text(f"""
name = "oc"
kernel = "{kernel}"
initrd = "{initrd}"
kernel_args = "{kernel_args}"
accel = "tcg"
output_commit = "{'on' if output_commit else 'off'}"
[memory]
size_mib = {mib}
backend = "file"
backend_id = "mem"
mem_path = "{mem_path}"
[[nics]]
id = "n0"
model = "{nic_model}"
mac = "52:54:00:12:34:56"
ifname = "qsp{tag}"
shadow_ifname = "qss{tag}"
""")
    return path


def peer_summary(path: Path) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"seqs": [], "contradict_bytes": 0, "dup_bytes": 0, "connections": 0}
    return doc


async def wait_peer(path: Path, pred: Any, timeout: float, what: str,
                    agents: tuple[Agent | None, ...] = (), serial: Path | None = None
                    ) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        doc = peer_summary(path)
        if pred(doc):
            return doc
        if time.monotonic() > deadline:
            raise AssertionError(f"peer: {what} not seen within {timeout}s: "
                                 f"{ {k: v for k, v in doc.items() if k != 'seqs'} } "
                                 f"seqs[-5:]={doc.get('seqs', [])[-5:]}" + "".join(
                                     f"\n--- {a.out.name}:\n{a.text()[-2000:]}"
                                     for a in agents if a is not None)
                                 + (f"\n--- {serial}:\n{_not_counters(serial.read_text())}"
                                    if serial is not None and serial.exists() else "")
                                 + f"\nnow {time.time()}")
        await asyncio.sleep(0.1)


def _not_counters(text: str) -> str:
    return "\n".join(x for x in text.splitlines() if not x.startswith("COUNTER"))[-1500:]


def serial_counters(text: str) -> list[int]:
    return [c.counter for c in parse_serial(text)]


@pytest.mark.parametrize("output_commit", [True, False], ids=["on", "off"])
async def test_failover_output(launch_vm: LaunchVm, short_tmp: Path, broker: Mosquitto,
                               tcg: AccelChoice, output_commit: bool) -> None:
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(reason)
    tag = f"{os.getpid() % 10000}{'n' if output_commit else 'f'}"
    spec_path = write_net_spec(short_tmp / "vm.toml", short_tmp / "primary.ram",
                               output_commit=output_commit, tag=tag)
    spec = VmSpec.from_toml(spec_path)
    peer_out = short_tmp / "peer.json"
    promoted_pid = None
    with Lan.create() as lan:
        peer = subprocess.Popen(lan.ns.exec_argv(
            [sys.executable, "-m", "qmpshadow.testing.tcppeer", "--listen",
             f"{lan.peer_addr}:{PORT}", "--iface", "br0", "--out", str(peer_out)]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shadow = source = None
        try:
            vm = await launch_vm(spec, accel=tcg)
            lan.attach(spec.nics[0].ifname)
            replica = short_tmp / "replica"
            link = f"unix:{short_tmp / 'link.sock'}"
            cargs = cluster_args(broker, lease_ms=3000)
            shadow = shadow_agent(spec_path, replica, link, short_tmp / "shadow.out", cargs)
            await shadow.wait_event(lambda e: e.get("event") == "shadow-ready")
            lan.attach(spec.nics[0].shadow_ifname)
            source = source_agent(spec_path, vm.run.qmp2_sock, link, short_tmp / "source.out",
                                  cargs, extra=["--interval", str(INTERVAL_MS)])
            await source.wait_event(lambda e: e.get("event") == "lease-protected", timeout=30)
            await shadow.wait_event(lambda e: e.get("event") == "watch-armed", timeout=30)
            # boot + first connection (the guest pings the peer until it answers)
            await wait_peer(peer_out, lambda d: len(d["seqs"]) >= 20, 40, "20 SEQ lines",
                            (source, shadow))
            # kill mid-epoch: the source agent emits an epoch once it is shipped, then
            # waits the interval before the next stop; 0.65 of it later the primary has
            # said things after that checkpoint (the guest prints every 0.1 s + its work)
            n = source.count("epoch")
            await source.wait_event(lambda e: e.get("event") == "epoch"
                                    and e["epoch"] > n + 1, timeout=30)
            if output_commit:
                await asyncio.sleep(INTERVAL_MS / 1000 * 0.65)
            else:  # QEMU writes the log itself: kill on the first line after the epoch
                seen = len(serial_counters(vm.run.serial_log.read_text(errors="replace")))
                deadline = time.monotonic() + INTERVAL_MS / 1000 * 0.8
                while time.monotonic() < deadline and len(serial_counters(
                        vm.run.serial_log.read_text(errors="replace"))) == seen:
                    await asyncio.sleep(0.005)
            before = peer_summary(peer_out)
            ev, states = await kill_until_failover(vm, shadow, replica)
            promoted_pid = ev["pid"]
            assert_one_copy(states)
            # the promoted guest streams on from its checkpoint: give it time to
            # retransmit/resend. Whether the connection survives is reported, not asserted:
            # without output commit the peer has acknowledged bytes the shadow has not sent
            # yet, and Linux ignores such ACKs (the connection may stall, seen here); with
            # it, it went on in most runs but stalled in some (not understood yet).
            last = max(before["seqs"], default=0)
            went_on = True
            try:
                await wait_peer(peer_out, lambda d: max(d["seqs"], default=0) >= last + 10
                                or d["connections"] > 1, 20,
                                "the stream going on after the failover")
            except AssertionError:
                went_on = False
            await asyncio.sleep(1.0)
            after = peer_summary(peer_out)
            primary_serial = serial_counters(vm.run.serial_log.read_text(errors="replace"))
            shadow_serial = serial_counters(
                (replica / "standby" / "serial.log").read_text(errors="replace"))
            seqs = after["seqs"]
            repeats = [(a, b) for a, b in itertools.pairwise(seqs) if b <= a]
            gaps = [(a, b) for a, b in itertools.pairwise(seqs) if b > a + 1]
            serial_repeats = [c for c in shadow_serial if primary_serial
                              and c <= primary_serial[-1]]
            report = {"output_commit": output_commit, "epoch": ev["epoch"],
                      "stream_went_on": went_on,
                      "connections": after["connections"], "segments": after["segments"],
                      "dup_bytes": after["dup_bytes"],
                      "contradict_bytes": after["contradict_bytes"],
                      "first_contradiction": after["first_contradiction"],
                      "seq_repeats": repeats[:5], "seq_gaps": gaps[:5],
                      "seq_before_kill": last, "seq_last": seqs[-1] if seqs else None,
                      "serial_primary_last": primary_serial[-1:],
                      "serial_shadow_first": shadow_serial[:1],
                      "serial_repeats": serial_repeats[:5]}
            print("output-commit failover:", json.dumps(report))
            assert primary_serial and shadow_serial, report
            if output_commit:
                assert after["contradict_bytes"] == 0, report
                assert not repeats, report
                assert not after["bad_lines"], (after["bad_lines"][:5], report)
                assert not serial_repeats, report
            else:
                # the duplicates: the shadow says again what the dead primary had said.
                # On the TCP stream they show as re-sent bytes (dup/contradict in the
                # report) only when the primary had sent stream bytes after the checkpoint,
                # which Nagle (waiting for the peer's ACK) often prevents in this window:
                # reported, not asserted
                assert serial_repeats, report
        finally:
            for a in (source, shadow):
                if a is not None:
                    a.close()
            kill_pid(promoted_pid)
            peer.kill()
            peer.wait(5)
