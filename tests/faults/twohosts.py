"""Two "hosts" for the fault suite: network namespaces the test creates, joined by a veth
pair, with the agents in them (TCP + mutual TLS between them) and ways to hurt the link.

- :func:`two_hosts`: primary QEMU (test namespace; its QMP socket is a unix path reachable
  from both), shadow agent in ``ns_s`` listening on the veth, source agent in ``ns_p``;
  returns once epochs commit.
- :func:`impair_link`: a slow and lossy link on both ends of the veth. With ``sch_netem``
  it is one netem qdisc (delay, jitter, loss, rate); kernels without netem (this project's
  CI VM has none) get a token-bucket rate limit (``tbf``: the queue adds delay, and drops
  what would wait longer than its latency bound) plus random loss from an nftables rule
  (``numgen random``) in each namespace. :func:`clear_impairment` undoes both.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from qmpshadow.cluster.mosquitto import Mosquitto, mosquitto_unavailable_reason
from qmpshadow.qemu.accel import AccelChoice
from qmpshadow.qemu.spec import VmSpec
from qmpshadow.qemu.testguest import wait_for_counter
from qmpshadow.testing.netns import Netns, Veth, netns_unavailable_reason
from tests.faults.e2e import CLI, Agent, cluster_args, write_spec
from tests.integration.conftest import LaunchVm

PORT = 47311
NFT_TABLE = "qsimpair"


def skip_without_netns() -> None:
    reason = netns_unavailable_reason() or mosquitto_unavailable_reason()
    if reason:
        pytest.skip(reason)


def make_certs(tmp: Path) -> Path:
    certs = tmp / "certs"
    subprocess.run([*CLI, "certs", "init", str(certs), "--names", "source,shadow"],
                   check=True, capture_output=True)
    return certs


async def two_hosts(launch_vm: LaunchVm, tmp: Path, tcg: AccelChoice, ns_p: Netns,
                    ns_s: Netns, shadow_addr: str, broker: Mosquitto, lease_ms: int
                    ) -> tuple[Any, Agent, Agent, Path, Path]:
    """(primary QemuProcess, shadow agent, source agent, replica dir, spec path)."""
    certs = make_certs(tmp)
    spec_path = write_spec(tmp / "vm.toml", tmp / "primary.ram", name="part")
    vm = await launch_vm(VmSpec.from_toml(spec_path), accel=tcg)
    await wait_for_counter(vm.run.serial_log, timeout=30)
    replica = tmp / "replica"
    cargs = cluster_args(broker, lease_ms=lease_ms)
    shadow = Agent([*CLI, "shadow", "--spec", str(spec_path), "--replica", str(replica),
                    "--listen", f"tcp:{shadow_addr}:{PORT}", "--tls", str(certs),
                    "--accel", "tcg", "--json", *cargs], tmp / "shadow.out",
                   prefix=ns_s.exec_argv([]))
    await shadow.wait_event(lambda e: e.get("event") == "shadow-ready")
    source = Agent([*CLI, "protect", "--spec", str(spec_path), "--qmp",
                    str(vm.run.qmp2_sock), "--to", f"tcp:{shadow_addr}:{PORT}", "--tls",
                    str(certs), "--interval", "200", "--json", "--fencer-log",
                    str(tmp / "fencer.log"), *cargs], tmp / "source.out",
                   prefix=ns_p.exec_argv([]))
    await shadow.wait_event(lambda e: e.get("event") == "watch-armed", timeout=30)
    await shadow.wait_event(lambda e: e.get("event") == "committed" and e["epoch"] >= 3,
                            timeout=60)
    return vm, shadow, source, replica, spec_path


def _ends(veth: Veth) -> list[tuple[str, str]]:
    assert veth.host_ns is not None, "impair_link needs a veth between two namespaces"
    return [(veth.host_ns, veth.host_if), (veth.peer_ns, veth.peer_if)]


def _run(ns: str, argv: list[str], *, check: bool = True, stdin: str | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          timeout=30, check=check, input=stdin)


def impairment_unavailable_reason() -> str | None:
    if shutil.which("tc") is None:
        return "tc (iproute2) is not installed"
    if shutil.which("nft") is None:
        return "nft is not installed (Debian: apt-get install nftables; make deps does)"
    return None


def impair_link(veth: Veth, *, rate_mbit: int, loss_pct: float, delay_ms: int,
                jitter_ms: int) -> str:
    """Make both directions of ``veth`` slow and lossy; returns what was applied."""
    done = []
    for ns, dev in _ends(veth):
        netem = _run(ns, ["tc", "qdisc", "add", "dev", dev, "root", "netem", "delay",
                          f"{delay_ms}ms", f"{jitter_ms}ms", "loss", f"{loss_pct}%", "rate",
                          f"{rate_mbit}mbit"], check=False)
        if netem.returncode == 0:
            done.append(f"{dev}: netem delay {delay_ms}±{jitter_ms} ms loss {loss_pct}% "
                        f"rate {rate_mbit} Mbit/s")
            continue
        latency = max(50, 2 * delay_ms)
        _run(ns, ["tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{rate_mbit}mbit",
                  "burst", "32kb", "latency", f"{latency}ms"])
        per_mille = round(loss_pct * 10)
        rules = (f"table inet {NFT_TABLE} {{\n chain out {{\n  type filter hook output "
                 f"priority 0; policy accept;\n  oifname \"{dev}\" numgen random mod 1000 < "
                 f"{per_mille} counter drop\n }}\n}}\n")
        _run(ns, ["nft", "-f", "-"], stdin=rules)
        done.append(f"{dev}: tbf {rate_mbit} Mbit/s (queue ≤ {latency} ms) + nft random "
                    f"loss {loss_pct}% (no sch_netem: {netem.stderr.strip()})")
    return "; ".join(done)


def dropped(veth: Veth) -> int:
    """Packets the nftables loss rules dropped so far (0 with netem)."""
    n = 0
    for ns, _dev in _ends(veth):
        out = _run(ns, ["nft", "list", "table", "inet", NFT_TABLE], check=False).stdout
        for word, nxt in zip(out.split(), out.split()[1:], strict=False):
            if word == "packets" and nxt.isdigit():
                n += int(nxt)
    return n


def clear_impairment(veth: Veth) -> None:
    for ns, dev in _ends(veth):
        _run(ns, ["tc", "qdisc", "del", "dev", dev, "root"], check=False)
        _run(ns, ["nft", "delete", "table", "inet", NFT_TABLE], check=False)
