"""Boot the dirtier test guest in real QEMU and check its counters and its self-check.

Every test here runs QEMU (marker ``qemu``); each takes a few seconds under TCG. The guest
kernel is built on first use with ``make -C qemu-scripts/guest`` (needs gcc, binutils, make).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qmpshadow.errors import ConfigError
from qmpshadow.qemu.testguest import (
    PAGE_MAGIC,
    PAGE_SIZE,
    PATTERNS,
    REGION_BASE,
    CounterLine,
    boot_command,
    build_guest,
    guest_kernel_path,
    kernel_args,
    parse_serial,
    parse_start_line,
    wait_for_counter,
)

QEMU = "qemu-system-x86_64"
MEM_MIB = 128
# A small region keeps a full rotation short: 4 MiB / 16 pages = 64 loops.
REGION_MIB = 4
PAGES = 16
ROTATION = REGION_MIB * 256 // PAGES

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} is not installed"),
]


@pytest.fixture(scope="module")
def kernel() -> Path:
    """The built guest kernel: $QMPSHADOW_GUEST_KERNEL, else built by make (idempotent)."""
    if os.environ.get("QMPSHADOW_GUEST_KERNEL"):
        return guest_kernel_path()
    if shutil.which("make") is None or shutil.which("gcc") is None:
        with contextlib.suppress(ConfigError):
            return guest_kernel_path()
        pytest.skip("gcc/make missing and no prebuilt guest kernel")
    return build_guest()


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short directory (unix socket paths must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="qsg-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def shm_ram() -> Iterator[Path]:
    """A RAM file for memory-backend-file in /dev/shm, removed afterwards."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    fd, name = tempfile.mkstemp(prefix="qmpshadow-testguest-", dir=base)
    os.close(fd)
    path = Path(name)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


@dataclass
class Guest:
    proc: asyncio.subprocess.Process
    serial: Path
    stderr: Path
    started: float

    def text(self) -> str:
        return self.serial.read_text(errors="replace") if self.serial.exists() else ""

    def counters(self) -> list[CounterLine]:
        return parse_serial(self.text())

    def diagnostics(self) -> str:
        err = self.stderr.read_text(errors="replace") if self.stderr.exists() else ""
        tail = self.text()[-1500:]
        return f"qemu rc={self.proc.returncode} stderr={err[-1500:]!r} serial tail={tail!r}"


@contextlib.asynccontextmanager
async def run_qemu(cmd: list[str], serial: Path, name: str) -> AsyncIterator[Guest]:
    """Start QEMU, yield it, and always kill and reap it."""
    stderr = serial.with_name(f"{name}.stderr")
    with stderr.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=err, stderr=err
        )
    guest = Guest(proc, serial, stderr, time.monotonic())
    try:
        yield guest
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def wait_counter(
    guest: Guest, *, above: int | None = None, timeout: float = 15
) -> CounterLine:
    """wait_for_counter, but fail fast with QEMU's stderr if QEMU died."""
    waiter = asyncio.ensure_future(
        wait_for_counter(guest.serial, min_counter=above, timeout=timeout, poll_interval=0.02)
    )
    died = asyncio.ensure_future(guest.proc.wait())
    try:
        done, _ = await asyncio.wait({waiter, died}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for fut in (waiter, died):
            if not fut.done():
                fut.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await fut
    if waiter in done:
        return waiter.result()
    pytest.fail(f"QEMU exited early: {guest.diagnostics()}")


def assert_healthy(lines: list[CounterLine]) -> None:
    assert lines, "no COUNTER lines"
    counters = [line.counter for line in lines]
    assert counters == sorted(counters), f"counter went backwards: {counters}"
    assert len(set(counters)) == len(counters), f"counter repeated: {counters}"
    assert all(line.mism == 0 for line in lines), f"mismatches reported: {lines[-1]}"


async def qmp_connect(sock: Path, timeout: float = 10) -> Any:
    from qemu.qmp import QMPClient

    client = QMPClient("qmpshadow-test")
    deadline = time.monotonic() + timeout
    while True:
        try:
            await client.connect(str(sock))
            return client
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("pattern", PATTERNS)
async def test_boot_each_pattern_counts_without_mismatch(
    kernel: Path, workdir: Path, pattern: str
) -> None:
    serial = workdir / "serial.log"
    append = kernel_args(
        pages=PAGES, region_mib=REGION_MIB, delay_us=200, pattern=pattern, print_ms=50
    )
    cmd = boot_command(kernel=kernel, serial_log=serial, append=append, mem_mib=MEM_MIB)
    async with run_qemu(cmd, serial, "qemu") as guest:
        first = await wait_counter(guest)
        boot_s = time.monotonic() - guest.started
        # three full rotations: every page was verified at least twice
        await wait_counter(guest, above=first.counter + 3 * ROTATION)
        t0, c0 = time.monotonic(), guest.counters()[-1].counter
        await asyncio.sleep(1.0)
        rate = (guest.counters()[-1].counter - c0) / (time.monotonic() - t0)
    text = guest.text()
    start = parse_start_line(text)
    assert start is not None, text[:500]
    assert start.pattern == pattern
    assert start.pages == PAGES
    assert start.slots == REGION_MIB * 256
    assert "warning" not in text.lower()
    assert "MISMATCH" not in text
    assert_healthy(parse_serial(text))
    print(f"\n[{pattern}] first COUNTER after {boot_s:.2f}s, {rate:.0f} loops/s at delay=200us")


async def test_region_clamped_to_memory(kernel: Path, workdir: Path) -> None:
    serial = workdir / "serial.log"
    # 32 MiB of RAM leaves < 24 MiB above 8 MiB: a 64 MiB region must be clamped.
    append = kernel_args(region_mib=64, delay_us=0, pattern="repeat", print_ms=20)
    cmd = boot_command(kernel=kernel, serial_log=serial, append=append, mem_mib=32)
    async with run_qemu(cmd, serial, "qemu") as guest:
        first = await wait_counter(guest)
        start = parse_start_line(guest.text())
        assert start is not None
        await wait_counter(guest, above=first.counter + 2 * start.slots // start.pages)
    text = guest.text()
    assert "DIRTIER warning: region=64 MiB does not fit" in text
    assert start.slots * PAGE_SIZE <= (32 << 20) - REGION_BASE
    assert start.slots % start.pages == 0
    assert_healthy(parse_serial(text))


async def test_pause_resume_then_corruption_is_detected(
    kernel: Path, workdir: Path, shm_ram: Path
) -> None:
    """Pause/resume keeps counting with mism=0; RAM corrupted from outside is reported."""
    serial = workdir / "serial.log"
    sock = workdir / "qmp.sock"
    slots = REGION_MIB * 256
    append = kernel_args(
        pages=PAGES, region_mib=REGION_MIB, delay_us=200, pattern="text", print_ms=20
    )
    cmd = boot_command(
        kernel=kernel,
        serial_log=serial,
        append=append,
        mem_mib=MEM_MIB,
        mem_path=shm_ram,
        qmp_socket=sock,
    )
    async with run_qemu(cmd, serial, "qemu") as guest:
        first = await wait_counter(guest)
        await wait_counter(guest, above=first.counter + 2 * ROTATION)
        qmp = await qmp_connect(sock)
        try:
            # 1. plain pause/resume: the counter carries on, nothing is reported
            await qmp.execute("stop")
            await asyncio.sleep(0.3)
            before = guest.counters()[-1].counter
            await asyncio.sleep(0.3)
            assert guest.counters()[-1].counter == before, "guest ran while stopped"
            await qmp.execute("cont")
            await wait_counter(guest, above=before + 2 * ROTATION)
            assert_healthy(guest.counters())

            # 2. corrupt one byte of every page of the region while the guest is stopped
            await qmp.execute("stop")
            await asyncio.sleep(0.2)
            stopped_at = guest.counters()[-1].counter
            with shm_ram.open("r+b") as ram:
                for slot in range(slots):
                    off = REGION_BASE + slot * PAGE_SIZE
                    ram.seek(off)
                    header = ram.read(8)
                    assert header[:4] == PAGE_MAGIC, f"slot {slot} not written by the guest"
                    assert int.from_bytes(header[4:8], "little") == slot
                    ram.seek(off + 100)
                    byte = ram.read(1)[0]
                    ram.seek(off + 100)
                    ram.write(bytes([byte ^ 0x5A]))
            await qmp.execute("cont")
            got = await wait_counter(guest, above=stopped_at + 2 * ROTATION)
            # a page the guest was in the middle of rewriting may escape; no more than a loop
            assert got.mism >= slots - PAGES, got
            assert got.mism <= slots, got
            # the guest rewrote every page: no further mismatches afterwards
            later = await wait_counter(guest, above=got.counter + 2 * ROTATION)
            assert later.mism == got.mism, (got, later)
            print(f"\ncorrupted {slots} pages at counter {stopped_at}: {got}, then {later}")
        finally:
            await qmp.disconnect()
    text = guest.text()
    assert "MISMATCH slot=" in text
    assert "first_bad=100" in text
    counters = [line.counter for line in parse_serial(text)]
    assert counters == sorted(counters)


async def test_live_migration_carries_on(kernel: Path, workdir: Path) -> None:
    """A live migration (TCG, unix socket) keeps the counter increasing with mism=0."""
    src_serial, dst_serial = workdir / "src.log", workdir / "dst.log"
    src_sock, dst_sock = workdir / "src.sock", workdir / "dst.sock"
    mig_sock = workdir / "mig.sock"
    append = kernel_args(
        pages=PAGES, region_mib=REGION_MIB, delay_us=200, pattern="random", print_ms=20
    )
    src_cmd = boot_command(
        kernel=kernel, serial_log=src_serial, append=append, mem_mib=MEM_MIB, qmp_socket=src_sock
    )
    dst_cmd = boot_command(
        kernel=kernel,
        serial_log=dst_serial,
        append=append,
        mem_mib=MEM_MIB,
        qmp_socket=dst_sock,
        extra=["-incoming", "defer"],
    )
    async with (
        run_qemu(src_cmd, src_serial, "src") as src,
        run_qemu(dst_cmd, dst_serial, "dst") as dst,
    ):
        first = await wait_counter(src)
        await wait_counter(src, above=first.counter + 2 * ROTATION)
        qsrc, qdst = await qmp_connect(src_sock), await qmp_connect(dst_sock)
        try:
            await qdst.execute("migrate-incoming", {"uri": f"unix:{mig_sock}"})
            await qsrc.execute(
                "migrate-set-parameters", {"max-bandwidth": 8 << 30, "downtime-limit": 300}
            )
            t0 = time.monotonic()
            await qsrc.execute("migrate", {"uri": f"unix:{mig_sock}"})
            deadline = t0 + 20
            while True:
                info = await qsrc.execute("query-migrate")
                status = info.get("status")
                if status == "completed":
                    break
                assert status not in ("failed", "cancelled"), info
                assert time.monotonic() < deadline, f"migration did not finish: {info}"
                await asyncio.sleep(0.05)
            took = time.monotonic() - t0
            last_src = src.counters()[-1].counter
            # "completed" is the source's view: wait for the destination to load and run
            # (slow on a loaded 2-core host), and say what it did if it does not
            deadline = time.monotonic() + 60
            while (await qdst.execute("query-status"))["status"] != "running":
                assert time.monotonic() < deadline, (
                    await qdst.execute("query-status"), await qdst.execute("query-migrate"))
                await asyncio.sleep(0.05)
            after = await wait_counter(dst, timeout=30)
            assert after.counter > last_src  # continues from the source's RAM
            final = await wait_counter(dst, above=after.counter + 2 * ROTATION)
            status_dst = await qdst.execute("query-status")
            assert status_dst["status"] == "running"
        finally:
            await qsrc.disconnect()
            await qdst.disconnect()
    assert_healthy(src.counters())
    dst_lines = parse_serial(dst.text())
    assert_healthy(dst_lines)
    assert dst_lines[0].counter >= src.counters()[-1].counter
    assert "DIRTIER start" not in dst.text()  # it did not boot: it carried on
    assert final.mism == 0
    print(f"\nmigration took {took:.2f}s; src last {last_src}, dst first {dst_lines[0].counter}")


def _kvm_unusable() -> str | None:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError as exc:
        return f"/dev/kvm not usable: {exc}"
    os.close(fd)
    return None


@pytest.mark.kvm
async def test_boot_under_kvm(kernel: Path, workdir: Path) -> None:
    reason = _kvm_unusable()
    if reason:
        pytest.skip(reason)
    serial = workdir / "serial.log"
    # This host's /dev/kvm is a slow nested software implementation: SeaBIOS alone takes
    # 8-10 s, then a few tens of loops per second.
    append = kernel_args(pages=4, region_mib=1, delay_us=0, pattern="text", print_ms=20)
    cmd = boot_command(kernel=kernel, serial_log=serial, append=append, accel="kvm")
    async with run_qemu(cmd, serial, "qemu") as guest:
        try:
            first = await wait_counter(guest, timeout=40)  # firmware alone takes 8-10 s here
        except BaseException:
            err = guest.stderr.read_text(errors="replace") if guest.stderr.exists() else ""
            if guest.proc.returncode is not None and "kvm" in err.lower():
                pytest.skip(f"QEMU could not use KVM: {err.strip()[-300:]}")
            raise
        boot_s = time.monotonic() - guest.started
        # two full rotations of 64 loops: every page verified at least once
        await wait_counter(guest, above=first.counter + 2 * 64, timeout=20)
    text = guest.text()
    start = parse_start_line(text)
    assert start is not None
    assert start.slots == 256
    assert_healthy(parse_serial(text))
    print(f"\n[kvm] first COUNTER after {boot_s:.2f}s, last {parse_serial(text)[-1]}")


LINUX_GUEST = Path(__file__).resolve().parents[2] / "build" / "linux-guest"


@pytest.mark.slow
async def test_linux_guest_boots_under_tcg(workdir: Path) -> None:
    """The optional Debian-kernel + busybox guest (qemu-scripts/build-linux-guest.sh).

    Opt-in: runs only when that script has been run (it installs Debian packages, so no
    test runs it); ~20 s under TCG.
    """
    vmlinuz, initrd = LINUX_GUEST / "vmlinuz", LINUX_GUEST / "initramfs.cpio.gz"
    if not (vmlinuz.is_file() and initrd.is_file()):
        pytest.skip(
            "Linux test guest not built: run qemu-scripts/build-linux-guest.sh (installs "
            "busybox-static, linux-image-amd64, cpio)"
        )
    serial = workdir / "console.log"
    cmd = [
        QEMU,
        *("-machine", "pc", "-accel", "tcg", "-cpu", "qemu64", "-m", "256"),
        *("-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"),
        *("-kernel", str(vmlinuz), "-initrd", str(initrd)),
        *("-append", "console=ttyS0 panic=-1 lg.mib=2 lg.delay=0.05"),
        *("-chardev", f"file,id=s0,path={serial}", "-serial", "chardev:s0"),
    ]
    async with run_qemu(cmd, serial, "qemu") as guest:
        first = await wait_counter(guest, timeout=90)
        boot_s = time.monotonic() - guest.started
        await wait_counter(guest, above=first.counter + 2, timeout=30)
    text = guest.text()
    assert "LINUXGUEST ready kernel=" in text
    assert_healthy(parse_serial(text))
    print(f"\n[linux] first COUNTER after {boot_s:.1f}s, last {parse_serial(text)[-1]}")
