"""Shared fixtures for tests that run real QEMU.

- ``short_tmp``: a short temporary directory (unix socket paths are limited to 107
  bytes, pytest's ``tmp_path`` can exceed that).
- ``run_dir``: a fresh ``RunPaths`` under ``short_tmp``.
- ``tcg`` / ``kvm`` / ``accel``: resolved ``AccelChoice``; ``kvm`` skips (with the
  probe's reason) where KVM is unusable; ``accel`` is ``detect_accel()`` (honours
  ``$QMPSHADOW_ACCEL``; on this project's host KVM is nested and slow, so prefer ``tcg``
  unless a test is about KVM).
- ``vm_spec``: a minimal spec (SeaBIOS, no kernel: it boots and idles, enough for QMP).
- ``launch_vm``: async factory ``await launch_vm(spec=None, *, role="primary",
  accel="tcg", mem_path=None, incoming=False, extra_args=(), run=None, name=None)``
  returning a started ``QemuProcess``; every process is SIGKILLed and reaped at teardown.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import pytest

from qmpshadow.errors import AccelError
from qmpshadow.qemu.accel import AccelChoice, detect_accel
from qmpshadow.qemu.argv import QEMU_BINARY, RunPaths, primary_argv, shadow_argv
from qmpshadow.qemu.process import QemuProcess
from qmpshadow.qemu.spec import MemorySpec, VmSpec

LaunchVm = Callable[..., Awaitable[QemuProcess]]


def _require_qemu() -> None:
    if shutil.which(QEMU_BINARY) is None:
        pytest.skip(f"{QEMU_BINARY} not installed (Debian: apt-get install qemu-system-x86)")


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path (for unix sockets), removed afterwards
    (kept with ``QS_KEEP_TMP=1``, to read agents' logs after a failure)."""
    path = Path(tempfile.mkdtemp(prefix="qs-", dir="/tmp"))
    try:
        yield path
    finally:
        if not os.environ.get("QS_KEEP_TMP"):
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def run_dir(short_tmp: Path) -> RunPaths:
    """A fresh run directory for one QEMU."""
    return RunPaths.create(short_tmp / "run")


@pytest.fixture
def tcg() -> AccelChoice:
    """TCG, which works everywhere."""
    return AccelChoice("tcg", "tests default to TCG")


@pytest.fixture
def kvm() -> AccelChoice:
    """KVM when usable here, else skip with the reason."""
    try:
        return detect_accel("kvm")
    except AccelError as err:
        pytest.skip(str(err))


@pytest.fixture
def accel() -> AccelChoice:
    """What ``detect_accel("auto")`` picks here (KVM if usable, else TCG)."""
    return detect_accel()


@pytest.fixture
def vm_spec() -> VmSpec:
    """Minimal VM: 64 MiB, plain RAM, no kernel (SeaBIOS idles), serial to the run dir."""
    return VmSpec(name="t", memory=MemorySpec(size_mib=64))


@pytest.fixture
async def launch_vm(short_tmp: Path, vm_spec: VmSpec) -> AsyncIterator[LaunchVm]:
    """Factory launching QEMUs that are killed and reaped at teardown."""
    _require_qemu()
    procs: list[QemuProcess] = []
    counter = 0

    async def launch(
        spec: VmSpec | None = None,
        *,
        role: Literal["primary", "shadow"] = "primary",
        accel: AccelChoice | str = "tcg",
        mem_path: str | Path | None = None,
        incoming: bool = False,
        extra_args: Sequence[str] = (),
        run: RunPaths | None = None,
        name: str | None = None,
        start_timeout: float = 10.0,
    ) -> QemuProcess:
        nonlocal counter
        counter += 1
        spec = spec or vm_spec
        run = run or RunPaths.create(short_tmp / f"{role}{counter}")
        argv: list[str]
        if role == "primary":
            argv = primary_argv(spec, run, accel=accel, incoming=incoming)
        else:
            shadow_mem = mem_path if mem_path is not None else short_tmp / f"shadow{counter}.ram"
            argv = shadow_argv(spec, run, accel=accel, mem_path=shadow_mem)
        argv += list(extra_args)
        proc = QemuProcess(
            argv, run, name=name or f"{role}{counter}", start_timeout=start_timeout,
            die_with_parent=True,
        )
        procs.append(proc)
        await proc.start()
        return proc

    try:
        yield launch
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            if proc.started:
                await proc.wait()
