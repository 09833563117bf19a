"""Acceptance, two hosts: the shadow agent (and its standby QEMU) in a network namespace,
the source agent next to the primary, TCP with mutual TLS between them, all through the CLI.
A peer whose certificate another CA signed is refused. Then kill -9 and promote."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qmpshadow.qemu.accel import AccelChoice
from qmpshadow.qemu.spec import VmSpec
from qmpshadow.qemu.testguest import (
    guest_kernel_path,
    kernel_args,
    parse_serial,
    resume_bound,
    wait_for_counter,
)
from qmpshadow.testing.netns import netns_unavailable_reason, temporary_netns
from tests.integration.conftest import LaunchVm

pytestmark = [pytest.mark.qemu, pytest.mark.netns, pytest.mark.slow]
MIB = 64
CLI = [sys.executable, "-m", "qmpshadow.cli.main"]


def _spec_toml(path: Path, mem_path: Path) -> None:
    path.write_text(f"""
name = "twohost"
kernel = "{guest_kernel_path()}"
kernel_args = "{kernel_args(pages=16, region_mib=8, delay_us=1000, pattern='text',
                            print_ms=100)}"
accel = "tcg"
[memory]
size_mib = {MIB}
backend = "file"
backend_id = "mem"
mem_path = "{mem_path}"
""")


def _events(proc_out: Path) -> list[dict[str, object]]:
    out = []
    for line in proc_out.read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


async def test_tls_across_namespaces_then_promote(launch_vm: LaunchVm, short_tmp: Path,
                                                  tcg: AccelChoice) -> None:
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(reason)
    certs, other = short_tmp / "certs", short_tmp / "other-ca"
    for d in (certs, other):
        subprocess.run([*CLI, "certs", "init", str(d), "--names", "source,shadow"],
                       check=True, capture_output=True)
    mem_path = short_tmp / "primary.ram"
    spec_path = short_tmp / "vm.toml"
    _spec_toml(spec_path, mem_path)
    spec = VmSpec.from_toml(spec_path)
    vm = await launch_vm(spec, accel=tcg)
    await wait_for_counter(vm.run.serial_log, timeout=30)
    replica = short_tmp / "replica"
    control = short_tmp / "control.sock"
    with temporary_netns() as ns:
        link = ns.veth_to_host()
        port = 47000 + os.getpid() % 1000
        shadow_out = short_tmp / "shadow.out"
        source_out = short_tmp / "source.out"
        shadow_f, source_f = shadow_out.open("w"), source_out.open("w")
        shadow = subprocess.Popen(
            ns.exec_argv([*CLI, "shadow", "--spec", str(spec_path), "--replica", str(replica),
                          "--listen", f"tcp:{link.peer_addr}:{port}", "--tls", str(certs),
                          "--control", str(control), "--accel", "tcg", "--json"]),
            stdout=shadow_f, stderr=subprocess.STDOUT)
        source = None
        try:
            deadline = time.monotonic() + 60
            while not any(e.get("event") == "shadow-ready" for e in _events(shadow_out)):
                assert shadow.poll() is None, shadow_out.read_text()
                assert time.monotonic() < deadline, shadow_out.read_text()
                await asyncio.sleep(0.1)
            # a peer with a certificate of another CA is refused
            bad = subprocess.run(
                [*CLI, "protect", "--spec", str(spec_path), "--qmp", str(vm.run.qmp2_sock),
                 "--to", f"tcp:{link.peer_addr}:{port}", "--tls", str(other), "--epochs", "1"],
                capture_output=True, text=True, timeout=60)
            assert "certificate" in (bad.stdout + bad.stderr).lower(), bad
            assert not any(e.get("event") == "committed" for e in _events(shadow_out))
            # the real source agent
            source = subprocess.Popen(
                [*CLI, "protect", "--spec", str(spec_path), "--qmp", str(vm.run.qmp2_sock),
                 "--to", f"tcp:{link.peer_addr}:{port}", "--tls", str(certs),
                 "--interval", "200", "--json"],
                stdout=source_f, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 60
            while sum(e.get("event") == "committed" for e in _events(shadow_out)) < 5:
                assert source.poll() is None, source_out.read_text()
                assert time.monotonic() < deadline, shadow_out.read_text()
                await asyncio.sleep(0.1)
            vm.kill()
            source.send_signal(signal.SIGKILL)
            last = resume_bound(parse_serial(vm.run.serial_log.read_text(errors="replace")))
            promote = subprocess.run([*CLI, "promote", "--control", str(control), "--json"],
                                     capture_output=True, text=True, timeout=60)
            assert promote.returncode == 0, promote
            result = json.loads(promote.stdout)
            assert result["epoch"] >= 5 and result["total_ms"] < 1000
            shadow.wait(30)
            assert shadow.returncode == 0, shadow_out.read_text()
            serial = replica / "standby" / "serial.log"
            await wait_for_counter(serial, timeout=30)
            first = parse_serial(serial.read_text(errors="replace"))[0]
            assert first.counter <= last, (first, last)
            await asyncio.sleep(10)
            lines = parse_serial(serial.read_text(errors="replace"))
            assert lines[-1].counter > first.counter + 10
            assert all(x.mism == 0 for x in lines)
        finally:
            for p in (source, shadow):
                if p is not None and p.poll() is None:
                    p.kill()
                    p.wait(10)
            ns.kill_all()
            shadow_f.close()
            source_f.close()
