"""Unit tests of qmpshadow.qemu.testguest (no QEMU needed)."""

from __future__ import annotations

import asyncio
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmpshadow.errors import ConfigError, QemuError, QmpShadowError
from qmpshadow.qemu import testguest
from qmpshadow.qemu.testguest import (
    CounterLine,
    boot_command,
    guest_kernel_path,
    kernel_args,
    parse_serial,
    parse_start_line,
    resume_bound,
    wait_for_counter,
)

# ---- kernel_args ----


def test_kernel_args_defaults() -> None:
    assert kernel_args() == "pages=16 region=16 delay=1000 pattern=text print=100"


def test_kernel_args_all_values() -> None:
    args = kernel_args(pages=4, region_mib=2, delay_us=0, pattern="random", print_ms=0)
    assert args == "pages=4 region=2 delay=0 pattern=random print=0"


@pytest.mark.parametrize("pattern", testguest.PATTERNS)
def test_kernel_args_patterns(pattern: str) -> None:
    assert f"pattern={pattern}" in kernel_args(pattern=pattern).split()


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"pages": 0}, "pages"),
        ({"pages": 65537}, "pages"),
        ({"pages": -1}, "pages"),
        ({"region_mib": 0}, "region_mib"),
        ({"region_mib": 4096}, "region_mib"),
        ({"delay_us": -1}, "delay_us"),
        ({"delay_us": 10_000_001}, "delay_us"),
        ({"print_ms": -5}, "print_ms"),
        ({"pattern": "zeros"}, "pattern"),
        ({"pattern": "Text"}, "pattern"),
        ({"pages": 1.5}, "pages"),
        ({"pages": True}, "pages"),
        ({"region_mib": "16"}, "region_mib"),
        ({"pages": 300, "region_mib": 1}, "exceeds"),
    ],
)
def test_kernel_args_rejects(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        kernel_args(**kwargs)  # type: ignore[arg-type]


def test_kernel_args_error_is_in_tree() -> None:
    with pytest.raises(QmpShadowError):
        kernel_args(pages=0)


def test_kernel_args_pages_equal_region_ok() -> None:
    assert kernel_args(pages=256, region_mib=1).startswith("pages=256 region=1 ")


# ---- parse_serial ----

LOG = (
    "DIRTIER start pages=16 region=16 delay=1000 pattern=text mem=127 print=100 slots=4096 "
    "base=0x800000 tsc_khz=2445389\r\n"
    "COUNTER 1 mism=0\r\n"
    "COUNTER 66 mism=0\r\n"
    "MISMATCH slot=3 addr=0x803000 expect_counter=5 got_magic=0x54524944 got_slot=3 "
    "got_counter=5 first_bad=100\r\n"
    "COUNTER 130 mism=1\r\n"
)


def test_parse_serial_basic() -> None:
    assert parse_serial(LOG) == [CounterLine(1, 0), CounterLine(66, 0), CounterLine(130, 1)]


def test_parse_serial_plain_newlines() -> None:
    assert parse_serial("COUNTER 5 mism=0\nCOUNTER 7 mism=2\n") == [
        CounterLine(5, 0),
        CounterLine(7, 2),
    ]


def test_parse_serial_drops_partial_last_line() -> None:
    # "COUNTER 12" may be the first bytes of "COUNTER 123 mism=0"
    assert parse_serial("COUNTER 1 mism=0\nCOUNTER 12") == [CounterLine(1, 0)]
    assert parse_serial("COUNTER 1 mism=0\r\nCOUNTER 2 mism=0") == [CounterLine(1, 0)]
    assert parse_serial("COUNTER 1 mism=0") == []


@pytest.mark.parametrize(
    "garbled",
    [
        "COUNTER mism=0",
        "COUNTER 12 mism=",
        "COUNTER 12 mism=x",
        "COUNTER -3 mism=0",
        "xCOUNTER 3 mism=0",
        "COUNTER 3 mism=0 extra",
        "COUNTER 3  mism=0",
        "COUN\x00TER 3 mism=0",
        "COUNTER 3\ufffd mism=0",
        "COUNTER 123456789012345678901 mism=0",
        "",
        "\r",
    ],
)
def test_parse_serial_ignores_garbled(garbled: str) -> None:
    text = f"COUNTER 1 mism=0\n{garbled}\nCOUNTER 2 mism=0\n"
    assert parse_serial(text) == [CounterLine(1, 0), CounterLine(2, 0)]


def test_parse_serial_large_counter() -> None:
    big = 2**64 - 1
    assert parse_serial(f"COUNTER {big} mism={big}\n") == [CounterLine(big, big)]


def test_counter_line_frozen() -> None:
    line = CounterLine(1, 0)
    with pytest.raises(AttributeError):
        line.counter = 2  # type: ignore[misc]
    assert line == CounterLine(1, 0)
    assert hash(line) == hash(CounterLine(1, 0))


@given(st.text())
def test_parse_serial_never_raises(text: str) -> None:
    for line in parse_serial(text):
        assert line.counter >= 0
        assert line.mism >= 0


@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)), max_size=20))
def test_parse_serial_roundtrip(pairs: list[tuple[int, int]]) -> None:
    text = "".join(f"COUNTER {c} mism={m}\r\n" for c, m in pairs)
    assert parse_serial(text) == [CounterLine(c, m) for c, m in pairs]


@given(st.text(alphabet="COUNTER mis=0123456789\r\n"), st.integers(0, 200))
def test_parse_serial_prefix_is_prefix(text: str, cut: int) -> None:
    """Reading a log earlier (a prefix of it) never yields lines the full log lacks."""
    assert parse_serial(text)[: len(parse_serial(text[:cut]))] == parse_serial(text[:cut])


# ---- parse_start_line ----


def test_parse_start_line() -> None:
    start = parse_start_line(LOG)
    assert start is not None
    assert start.pages == 16
    assert start.slots == 4096
    assert start.pattern == "text"
    assert start.fields["tsc_khz"] == "2445389"
    assert start.fields["base"] == "0x800000"


def test_parse_start_line_absent() -> None:
    assert parse_start_line("COUNTER 1 mism=0\n") is None
    assert parse_start_line("DIRTIER start pages=16") is None  # partial line


# ---- guest_kernel_path / build_guest ----


def test_guest_kernel_path_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(b"\x7fELF")
    monkeypatch.setenv(testguest.GUEST_KERNEL_ENV, str(kernel))
    assert guest_kernel_path() == kernel


def test_guest_kernel_path_env_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(testguest.GUEST_KERNEL_ENV, str(tmp_path / "nope.elf"))
    with pytest.raises(ConfigError, match="make guest"):
        guest_kernel_path()


def test_guest_kernel_path_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(testguest.GUEST_KERNEL_ENV, raising=False)
    expected = testguest.repo_root() / "build" / "guest" / "dirtier.elf"
    if expected.is_file():
        assert guest_kernel_path() == expected
    else:
        with pytest.raises(ConfigError, match="make guest"):
            guest_kernel_path()


def test_repo_root_has_guest_sources() -> None:
    assert (testguest.repo_root() / "qemu-scripts" / "guest" / "Makefile").is_file()


def test_built_kernel_has_multiboot_header(monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU's multiboot loader looks for the header in the first 8 KiB, 4-byte aligned."""
    monkeypatch.delenv(testguest.GUEST_KERNEL_ENV, raising=False)
    try:
        kernel = guest_kernel_path()
    except ConfigError:
        pytest.skip("guest kernel not built (make guest)")
    head = kernel.read_bytes()[:8192]
    assert head[:4] == b"\x7fELF"
    assert head[4] == 1, "QEMU's multiboot loader refuses 64-bit ELF"
    for off in range(0, len(head) - 12, 4):
        magic, flags, checksum = struct.unpack_from("<III", head, off)
        if magic == 0x1BADB002:
            assert (magic + flags + checksum) & 0xFFFFFFFF == 0
            assert not flags & 0x10000, "ELF kernel: no a.out kludge expected"
            return
    pytest.fail("no multiboot header in the first 8 KiB")


needs_toolchain = pytest.mark.skipif(
    shutil.which("make") is None or shutil.which("gcc") is None, reason="needs make and gcc"
)


@needs_toolchain
def test_build_guest_into_dir_is_idempotent(tmp_path: Path) -> None:
    out = tmp_path / "guest"
    kernel = testguest.build_guest(out=out)
    assert kernel == out / "dirtier.elf"
    assert kernel.read_bytes()[:4] == b"\x7fELF"
    mtime = kernel.stat().st_mtime_ns
    assert testguest.build_guest(out=out) == kernel
    assert kernel.stat().st_mtime_ns == mtime, "second make rebuilt the kernel"


@needs_toolchain
def test_build_guest_failure_is_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="building the test guest failed"):
        testguest.build_guest(out=blocker / "sub")


# ---- boot_command ----


def test_boot_command_plain(tmp_path: Path) -> None:
    cmd = boot_command(kernel=tmp_path / "k.elf", serial_log=tmp_path / "s.log")
    assert cmd[0] == "qemu-system-x86_64"
    assert cmd[cmd.index("-machine") + 1] == "pc"
    assert cmd[cmd.index("-accel") + 1] == "tcg"
    assert cmd[cmd.index("-append") + 1] == kernel_args()
    assert f"file,id=s0,path={tmp_path / 's.log'}" in cmd
    assert "-qmp" not in cmd
    assert "-object" not in cmd


def test_boot_command_shared_ram_qmp(tmp_path: Path) -> None:
    cmd = boot_command(
        kernel=tmp_path / "k.elf",
        serial_log=tmp_path / "s.log",
        append="pages=1",
        mem_mib=64,
        accel="kvm",
        mem_path=tmp_path / "ram",
        qmp_socket=tmp_path / "q.sock",
        extra=["-S"],
    )
    assert cmd[cmd.index("-machine") + 1] == "pc,memory-backend=mem"
    assert cmd[cmd.index("-object") + 1] == (
        f"memory-backend-file,id=mem,size=64M,mem-path={tmp_path / 'ram'},share=on"
    )
    assert cmd[cmd.index("-qmp") + 1] == f"unix:{tmp_path / 'q.sock'},server=on,wait=off"
    assert cmd[cmd.index("-append") + 1] == "pages=1"
    assert cmd[-1] == "-S"


@pytest.mark.parametrize(("kwargs"), [{"accel": "hvf"}, {"mem_mib": 8}])
def test_boot_command_rejects(tmp_path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        boot_command(kernel=tmp_path / "k", serial_log=tmp_path / "s", **kwargs)  # type: ignore[arg-type]


# ---- wait_for_counter ----


async def test_wait_for_counter_present(tmp_path: Path) -> None:
    log = tmp_path / "s.log"
    log.write_text("DIRTIER start pages=1\nCOUNTER 3 mism=0\nCOUNTER 9 mism=0\nCOUNTER 1")
    assert await wait_for_counter(log, timeout=1) == CounterLine(9, 0)


async def test_wait_for_counter_grows(tmp_path: Path) -> None:
    log = tmp_path / "s.log"

    async def writer() -> None:
        await asyncio.sleep(0.05)
        with log.open("a") as f:
            for n in range(1, 40):
                f.write(f"COUNTER {n} ")
                f.flush()
                await asyncio.sleep(0.002)
                f.write("mism=0\r\n")
                f.flush()

    task = asyncio.create_task(writer())
    try:
        got = await wait_for_counter(log, min_counter=30, timeout=5, poll_interval=0.001)
    finally:
        await task
    assert got.counter > 30
    assert got.mism == 0


async def test_wait_for_counter_file_recreated(tmp_path: Path) -> None:
    log = tmp_path / "s.log"
    log.write_text("COUNTER 500 mism=0\n" * 10)

    async def recreate() -> None:
        await asyncio.sleep(0.1)
        log.write_text("COUNTER 7 mism=0\n")
        await asyncio.sleep(0.1)
        with log.open("a") as f:
            f.write("COUNTER 11 mism=0\n")

    task = asyncio.create_task(recreate())
    try:
        got = await wait_for_counter(log, min_counter=1000, timeout=0.5, poll_interval=0.01)
    except QemuError as exc:
        assert "last COUNTER 11" in str(exc)
    else:
        pytest.fail(f"unexpected {got}")
    finally:
        await task


async def test_wait_for_counter_timeout_has_tail(tmp_path: Path) -> None:
    log = tmp_path / "s.log"
    log.write_text("DIRTIER start pages=16\nCOUNTER 4 mism=0\nDIRTIER fault vec=13")
    with pytest.raises(QemuError, match="timed out") as info:
        await wait_for_counter(log, min_counter=4, timeout=0.2, poll_interval=0.02)
    message = str(info.value)
    assert "counter > 4" in message
    assert "last COUNTER 4" in message
    assert "DIRTIER fault vec=13" in message
    assert str(log) in message


async def test_wait_for_counter_missing_file(tmp_path: Path) -> None:
    with pytest.raises(QemuError, match="does not exist"):
        await wait_for_counter(tmp_path / "none.log", timeout=0.1)


async def test_wait_for_counter_no_counter_yet(tmp_path: Path) -> None:
    log = tmp_path / "s.log"
    log.write_bytes(b"\xff\xfe garbage\n")
    with pytest.raises(QemuError, match="none"):
        await wait_for_counter(log, timeout=0.1)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
async def test_wait_for_counter_bad_timeout(tmp_path: Path, bad: float) -> None:
    with pytest.raises(ConfigError):
        await wait_for_counter(tmp_path / "s.log", timeout=bad)


def test_resume_bound_is_two_print_steps_past_the_last_line() -> None:
    lines = parse_serial("COUNTER 10 mism=0\nCOUNTER 30 mism=0\nCOUNTER 45 mism=0\n")
    assert resume_bound(lines) == 45 + 2 * 20
    assert resume_bound(lines[:1]) == 10
    with pytest.raises(ValueError, match="printed nothing"):
        resume_bound([])


def test_parse_serial_disk_fields_are_optional() -> None:
    text = ("COUNTER 5 mism=0\r\nCOUNTER 9 mism=1 dmism=2 derr=0\r\n"
            "COUNTER 10 mism=0 dmism=3\r\n")  # a dmism without derr is garbled
    assert parse_serial(text) == [CounterLine(5, 0), CounterLine(9, 1, 2, 0)]


def test_kernel_args_disk() -> None:
    assert kernel_args().endswith("print=100")  # unchanged without disk writes
    assert kernel_args(dslots=64, dchunk=16).endswith(" dslots=64 dchunk=16")
    with pytest.raises(ConfigError, match="dchunk"):
        kernel_args(dslots=4, dchunk=65)
