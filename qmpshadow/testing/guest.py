"""Test-guest helpers shared by integration tests and benches: specs of the dirtier guest
and checks that a guest carried on after a migration, failover or rollback.
"""

from __future__ import annotations

import os
from pathlib import Path

from qmpshadow.errors import QemuError
from qmpshadow.qemu.spec import AccelName, MemorySpec, VmSpec
from qmpshadow.qemu.testguest import (
    CounterLine,
    guest_kernel_path,
    kernel_args,
    parse_serial,
    wait_for_counter,
)

__all__ = ["dirtier_spec", "guest_continues", "last_counter"]


def dirtier_spec(name: str, *, mem_mib: int = 64, pages: int = 8, region_mib: int = 4,
                 delay_us: int = 1000, pattern: str = "text", print_ms: int = 100,
                 accel: AccelName = "auto", serial: Path | bool = True) -> VmSpec:
    """A VM spec booting the dirtier test guest (plain RAM).

    Defaults dirty 8 pages per ~1 ms loop in a 4 MiB region of a 64 MiB VM: light enough
    for QEMU's default bandwidth to converge, busy enough for several passes.

    Raises:
        ConfigError: the guest kernel is not built, or a parameter is out of range.
    """
    return VmSpec(name=name, memory=MemorySpec(size_mib=mem_mib), accel=accel,
                  kernel=guest_kernel_path(), serial=serial,
                  kernel_args=kernel_args(pages=pages, region_mib=region_mib,
                                          delay_us=delay_us, pattern=pattern,
                                          print_ms=print_ms))


def last_counter(serial_log: str | os.PathLike[str]) -> CounterLine | None:
    """The last complete COUNTER line of a serial log (None if none yet)."""
    try:
        text = Path(serial_log).read_text(errors="replace")
    except FileNotFoundError:
        return None
    lines = parse_serial(text)
    return lines[-1] if lines else None


async def guest_continues(serial_log: str | os.PathLike[str], *, after: int, loops: int = 20,
                          timeout: float = 30.0) -> CounterLine:
    """Wait until the guest's counter passed ``after + loops``; then check that no line of
    the log reports a mismatch. Returns the line reached.

    Raises:
        QemuError: no progress within ``timeout`` (the message carries the log tail), or a
            line with ``mism != 0`` (guest RAM changed behind the guest's back).
    """
    line = await wait_for_counter(serial_log, min_counter=after + loops, timeout=timeout)
    text = Path(serial_log).read_text(errors="replace")
    bad = [c for c in parse_serial(text) if c.mism]
    if bad:
        raise QemuError(
            f"{serial_log}: the guest reports corrupted memory: first line with mismatches "
            f"{bad[0]} (expected mism=0 throughout)")
    return line
