"""The project's test guest: the multiboot RAM dirtier in ``qemu-scripts/guest``.

The guest (``build/guest/dirtier.elf``) dirties ``pages`` pages per loop in a rotating region
of guest RAM starting at 8 MiB, checks before each overwrite that the page still holds what
the previous rotation wrote, and prints ``COUNTER <n> mism=<m>`` lines on COM1. This module
finds and builds the kernel, formats its command line, parses its serial output and waits
for progress. See docs/test-guest.md for the guest itself.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from qmpshadow.errors import ConfigError, QemuError

__all__ = [
    "DEFAULT_DELAY_US",
    "DEFAULT_PAGES",
    "DEFAULT_PATTERN",
    "DEFAULT_PRINT_MS",
    "DEFAULT_REGION_MIB",
    "GUEST_KERNEL_ENV",
    "PAGE_MAGIC",
    "PAGE_SIZE",
    "PATTERNS",
    "REGION_BASE",
    "CounterLine",
    "StartLine",
    "boot_command",
    "build_guest",
    "guest_kernel_path",
    "kernel_args",
    "parse_serial",
    "parse_start_line",
    "repo_root",
    "wait_for_counter",
]

GUEST_KERNEL_ENV: Final = "QMPSHADOW_GUEST_KERNEL"
"""Environment variable that overrides where the guest kernel is looked for."""

PATTERNS: Final = ("repeat", "text", "random")
DEFAULT_PAGES: Final = 16
DEFAULT_REGION_MIB: Final = 16
DEFAULT_DELAY_US: Final = 1000
DEFAULT_PATTERN: Final = "text"
DEFAULT_PRINT_MS: Final = 100

PAGE_SIZE: Final = 4096
REGION_BASE: Final = 8 * 1024 * 1024
"""Guest-physical address of slot 0 of the dirtied region (slot s is at base + s*4096)."""
PAGE_MAGIC: Final = b"DIRT"
"""First four bytes of every page the guest wrote (then le32 slot, le64 loop counter)."""

# Ranges the guest itself accepts (qemu-scripts/guest/dirtier.c, parse_cmdline).
_PAGES_RANGE: Final = (1, 65536)
_REGION_RANGE: Final = (1, 3584)
_DELAY_RANGE: Final = (0, 10_000_000)
_PRINT_RANGE: Final = (0, 3_600_000)

_COUNTER_RE: Final = re.compile(
    r"COUNTER (\d{1,20}) mism=(\d{1,20})(?: dmism=(\d{1,20}) derr=(\d{1,20}))?")
_DSLOTS_RANGE: Final = (0, 1 << 20)
_DCHUNK_RANGE: Final = (1, 64)
_START_RE: Final = re.compile(r"DIRTIER start((?: [a-z_]+=\S+)+)")
_TAIL_CHARS: Final = 1500


def repo_root() -> Path:
    """Return the root of the qmpshadow source tree this module was loaded from."""
    return Path(__file__).resolve().parents[2]


def _default_kernel() -> Path:
    return repo_root() / "build" / "guest" / "dirtier.elf"


def guest_kernel_path() -> Path:
    """Return the path of the built guest kernel.

    ``$QMPSHADOW_GUEST_KERNEL`` if set, else ``build/guest/dirtier.elf`` under the repo root.

    Raises:
        ConfigError: the kernel file does not exist (build it with ``make guest`` or
            ``make -C qemu-scripts/guest``).
    """
    env = os.environ.get(GUEST_KERNEL_ENV)
    path = Path(env) if env else _default_kernel()
    if not path.is_file():
        origin = f"${GUEST_KERNEL_ENV}" if env else "the default location"
        raise ConfigError(
            f"test guest kernel not found at {path} ({origin}); build it with `make guest` "
            f"(or `make -C qemu-scripts/guest`) in {repo_root()}"
        )
    return path


def build_guest(*, out: Path | None = None, timeout: float = 300.0) -> Path:
    """Build the guest kernel with ``make -C qemu-scripts/guest`` and return its path.

    Idempotent: make rebuilds only what changed. ``out`` overrides the output directory
    (make's ``OUT``); by default the kernel lands in ``build/guest/``.

    Raises:
        ConfigError: the guest sources are not there (installed package, not a checkout),
            make is missing, make failed (the message carries the tail of its output) or
            timed out.
    """
    src = repo_root() / "qemu-scripts" / "guest"
    if not (src / "Makefile").is_file():
        raise ConfigError(
            f"guest sources not found at {src}: build_guest() needs a qmpshadow source "
            f"checkout; set ${GUEST_KERNEL_ENV} to a prebuilt dirtier.elf instead"
        )
    cmd = ["make", "-C", str(src)]
    if out is not None:
        cmd.append(f"OUT={out.resolve()}")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise ConfigError(
            "`make` is not installed: install make, gcc and binutils to build the test guest"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise ConfigError(f"building the test guest timed out after {timeout}s") from exc
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-_TAIL_CHARS:]
        raise ConfigError(
            f"building the test guest failed ({' '.join(cmd)} exited {proc.returncode}); "
            f"it needs gcc, binutils and make. Output tail:\n{tail}"
        )
    return (out.resolve() if out is not None else _default_kernel().parent) / "dirtier.elf"


def _check_int(name: str, value: int, bounds: tuple[int, int]) -> None:
    lo, hi = bounds
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an int in {lo}..{hi}, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{name} must be in {lo}..{hi}, got {value}")


def kernel_args(
    pages: int = DEFAULT_PAGES,
    region_mib: int = DEFAULT_REGION_MIB,
    delay_us: int = DEFAULT_DELAY_US,
    pattern: str = DEFAULT_PATTERN,
    print_ms: int = DEFAULT_PRINT_MS,
    dslots: int = 0,
    dchunk: int = 8,
) -> str:
    """Return the guest's command line (QEMU ``-append``) for these parameters.

    ``pages``: pages dirtied per loop; ``region_mib``: size of the rotating region (placed
    at 8 MiB: the VM needs at least ``8 + region_mib`` MiB, else the guest clamps it and
    prints a warning); ``delay_us``: wait after each loop (0: none); ``pattern``: one of
    ``repeat``, ``text``, ``random``; ``print_ms``: COUNTER line period (0: every loop);
    ``dslots``: disk slots of ``dchunk`` sectors written (ATA PIO, first IDE disk) one
    per loop with the same rotation self-check (0: no disk writes).

    Raises:
        ConfigError: a value is not an int in the range the guest accepts, ``pages``
            exceeds the region's page count, or the pattern is unknown.
    """
    _check_int("pages", pages, _PAGES_RANGE)
    _check_int("region_mib", region_mib, _REGION_RANGE)
    _check_int("delay_us", delay_us, _DELAY_RANGE)
    _check_int("print_ms", print_ms, _PRINT_RANGE)
    _check_int("dslots", dslots, _DSLOTS_RANGE)
    _check_int("dchunk", dchunk, _DCHUNK_RANGE)
    if pattern not in PATTERNS:
        raise ConfigError(f"pattern must be one of {', '.join(PATTERNS)}; got {pattern!r}")
    region_pages = region_mib * (1024 * 1024 // PAGE_SIZE)
    if pages > region_pages:
        raise ConfigError(
            f"pages={pages} exceeds the {region_pages} pages of a {region_mib} MiB region; "
            f"lower pages or raise region_mib"
        )
    line = f"pages={pages} region={region_mib} delay={delay_us} pattern={pattern} print={print_ms}"
    return line + (f" dslots={dslots} dchunk={dchunk}" if dslots else "")


@dataclass(frozen=True, slots=True)
class CounterLine:
    """One ``COUNTER <n> mism=<m> [dmism=<d> derr=<e>]`` line: loops completed and
    mismatched pages so far; with disk writes on, mismatched disk chunks and disk I/O
    errors (None on lines without them)."""

    counter: int
    mism: int
    dmism: int | None = None
    derr: int | None = None


@dataclass(frozen=True, slots=True)
class StartLine:
    """The guest's ``DIRTIER start ...`` line (the effective, possibly clamped, settings)."""

    fields: dict[str, str]

    @property
    def pages(self) -> int:
        """Pages dirtied per loop."""
        return int(self.fields["pages"])

    @property
    def slots(self) -> int:
        """Pages in the rotating region (a multiple of ``pages``)."""
        return int(self.fields["slots"])

    @property
    def pattern(self) -> str:
        """The page-content pattern in use."""
        return self.fields["pattern"]


def _complete_lines(text: str) -> list[str]:
    # A trailing line without its newline may still be being written: drop it.
    lines = text.split("\n")
    return [line.rstrip("\r") for line in lines[:-1]]


def parse_serial(text: str) -> list[CounterLine]:
    """Return the COUNTER lines of a guest serial log, in order.

    Only complete lines (ended by a newline) that are exactly ``COUNTER <n> mism=<m>``,
    optionally followed by `` dmism=<d> derr=<e>``, are taken; partial, garbled and other
    lines (start line, warnings, MISMATCH reports) are
    ignored. Never raises on any input.
    """
    out: list[CounterLine] = []
    for line in _complete_lines(text):
        m = _COUNTER_RE.fullmatch(line)
        if m is not None:
            d, e = m.group(3), m.group(4)
            out.append(CounterLine(int(m.group(1)), int(m.group(2)),
                                   None if d is None else int(d), None if e is None else int(e)))
    return out


def resume_bound(lines: list[CounterLine]) -> int:
    """The highest first counter a copy resumed from a checkpoint of this run may print.

    ``lines`` are the primary's COUNTER lines up to its end. The guest prints at most every
    ``print_ms``, so the primary's last line and a resumed copy's first line can each be one
    print interval of loops away from the counter at the checkpoint: the bound is the last
    counter plus two of the largest steps between lines. Raises ValueError when ``lines``
    is empty.
    """
    if not lines:
        raise ValueError("no COUNTER lines: the primary printed nothing")
    step = max((b.counter - a.counter for a, b in itertools.pairwise(lines)), default=0)
    return lines[-1].counter + 2 * step


def parse_start_line(text: str) -> StartLine | None:
    """Return the last complete ``DIRTIER start`` line of a serial log, or None if none.

    Never raises on any input.
    """
    found: StartLine | None = None
    for line in _complete_lines(text):
        m = _START_RE.fullmatch(line)
        if m is not None:
            pairs = (item.split("=", 1) for item in m.group(1).split())
            found = StartLine({k: v for k, v in pairs})
    return found


def _tail(text: str) -> str:
    if not text:
        return "(empty)"
    return text[-_TAIL_CHARS:]


async def wait_for_counter(
    path: str | os.PathLike[str],
    *,
    min_counter: int | None = None,
    timeout: float,
    poll_interval: float = 0.05,
) -> CounterLine:
    """Poll the serial log at ``path`` until a COUNTER line shows progress; return it.

    Returns the latest complete COUNTER line once one exists, or, with ``min_counter``,
    once the latest one has ``counter > min_counter``. The file may not exist yet; it is
    read incrementally (a file that shrank, e.g. recreated by a new QEMU, is read anew).

    Raises:
        ConfigError: ``timeout`` or ``poll_interval`` is not positive.
        QemuError: no such line within ``timeout`` seconds; the message carries the tail
            of the log (or says the file never appeared).
    """
    if not timeout > 0:
        raise ConfigError(f"timeout must be positive, got {timeout!r}")
    if not poll_interval > 0:
        raise ConfigError(f"poll_interval must be positive, got {poll_interval!r}")
    target = Path(path)
    deadline = time.monotonic() + timeout
    offset = 0
    pending = ""  # text after the last newline read so far
    seen = ""  # recent complete text, for the error message
    latest: CounterLine | None = None
    exists = False
    while True:
        try:
            size = target.stat().st_size
            exists = True
            if size < offset:
                offset, pending, latest = 0, "", None
            if size > offset:
                with target.open("rb") as f:
                    f.seek(offset)
                    data = f.read(size - offset)
                offset += len(data)
                chunk = pending + data.decode("utf-8", errors="replace")
                cut = chunk.rfind("\n") + 1
                complete, pending = chunk[:cut], chunk[cut:]
                seen = (seen + complete)[-_TAIL_CHARS:]
                lines = parse_serial(complete)
                if lines:
                    latest = lines[-1]
        except FileNotFoundError:
            exists = False
        if latest is not None and (min_counter is None or latest.counter > min_counter):
            return latest
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            want = (
                "a COUNTER line"
                if min_counter is None
                else f"a COUNTER line with counter > {min_counter}"
            )
            got = "none" if latest is None else f"last COUNTER {latest.counter}"
            if not exists:
                detail = "the file does not exist (did QEMU start, with -serial to it?)"
            else:
                detail = f"log tail:\n{_tail(seen + pending)}"
            raise QemuError(
                f"timed out after {timeout}s waiting for {want} in {target} ({got}); "
                f"is the guest running (not paused) and booted with the dirtier kernel? "
                f"{detail}"
            )
        await asyncio.sleep(min(poll_interval, remaining))


def boot_command(
    *,
    kernel: Path,
    serial_log: Path,
    append: str | None = None,
    mem_mib: int = 128,
    accel: str = "tcg",
    qemu: str = "qemu-system-x86_64",
    mem_path: Path | None = None,
    qmp_socket: Path | None = None,
    extra: list[str] | None = None,
) -> list[str]:
    """Return a QEMU command line that boots the guest with COM1 logged to ``serial_log``.

    ``mem_path`` puts guest RAM in a shared file (``memory-backend-file`` id ``mem``,
    ``share=on``), so that guest-physical address ``a`` (below 3 GiB) is at file offset
    ``a``. ``qmp_socket`` adds a QMP server on that unix socket. ``append`` defaults to
    :func:`kernel_args` with its defaults.

    Raises:
        ConfigError: ``accel`` is not ``tcg`` or ``kvm``, or ``mem_mib`` cannot hold the
            region's base (at least 9 MiB).
    """
    if accel not in ("tcg", "kvm"):
        raise ConfigError(f"accel must be 'tcg' or 'kvm', got {accel!r}")
    _check_int("mem_mib", mem_mib, (9, 3 * 1024))
    machine = "pc"
    cmd = [qemu, "-accel", accel, "-cpu", "qemu64", "-m", str(mem_mib)]
    if mem_path is not None:
        machine += ",memory-backend=mem"
        cmd += [
            "-object",
            f"memory-backend-file,id=mem,size={mem_mib}M,mem-path={mem_path},share=on",
        ]
    cmd[1:1] = ["-machine", machine]
    cmd += [
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-kernel",
        str(kernel),
        "-append",
        append if append is not None else kernel_args(),
        "-chardev",
        f"file,id=s0,path={serial_log}",
        "-serial",
        "chardev:s0",
    ]
    if qmp_socket is not None:
        cmd += ["-qmp", f"unix:{qmp_socket},server=on,wait=off"]
    if extra:
        cmd += extra
    return cmd
