#!/usr/bin/env python3
"""Boot the soft-RoCE test guest under TCG and run one command inside it.

Usage::

    qemu-scripts/rdma-guest/run.py [options] -- CMD [ARG...]

The guest (built once by ``build.sh``: the host's Debian kernel + an uncompressed Debian
initramfs) boots with ``-smp 2``, loads ``rdma_rxe``, creates ``rxe0`` on ``lo``, mounts
this project read-only at ``/project`` and a writable share at ``/share`` (both 9p), and
runs ``CMD`` in ``/project`` with the guest's ``python3`` on ``PATH`` and
``QMPSHADOW_NO_EXTENSIONS=1``. The guest's console (and so ``CMD``'s output) is copied to
stdout, unless ``--quiet``.

Exit status: ``CMD``'s exit status; 77 when the guest cannot run here (QEMU, the kernel
or debootstrap missing; the reason is printed on stderr, starting ``SKIP:``); 124 on
timeout; 125 when the guest itself failed (no rxe0, no shares).

Options:
  --share DIR       the writable share (default: a fresh temporary directory, removed
                    afterwards); CMD finds it at /share, its output in /share/output.log
  --env KEY=VALUE   extra environment of CMD (repeatable)
  --timeout S       seconds for the whole boot-run-poweroff cycle (default 1200)
  --mem MIB         guest RAM (default 2048)
  --smp N           guest CPUs (default 2)
  --no-build        do not run build.sh (the image must exist)
  --quiet           do not echo the console
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OUT = Path(os.environ.get("OUT", ROOT / "build" / "rdma-guest"))
QEMU = "qemu-system-x86_64"
EXIT_RE = re.compile(r"RDMA-GUEST-EXIT (\d+)")
SKIP, TIMEOUT, FAILED = 77, 124, 125


def skip(reason: str) -> int:
    print(f"SKIP: {reason}", file=sys.stderr, flush=True)
    return SKIP


def unavailable_reason() -> str | None:
    """Why the guest cannot run on this host (None: it can, possibly after a build)."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} not installed (Debian: apt-get install qemu-system-x86)"
    image = OUT / "rootfs.cpio"
    if image.exists() and (OUT / "vmlinux").exists():
        return None
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    if not kernels and os.geteuid() != 0:
        return "no /boot/vmlinuz-* (Debian: apt-get install linux-image-amd64)"
    if kernels:
        rel = kernels[-1].name.removeprefix("vmlinuz-")
        mods = Path("/lib/modules") / rel
        if not any(mods.glob("kernel/drivers/infiniband/sw/rxe/rdma_rxe.ko*")):
            if os.geteuid() != 0:
                return f"kernel {rel} has no rdma_rxe module (install linux-image-amd64)"
    if shutil.which("debootstrap") is None and os.geteuid() != 0:
        return "debootstrap not installed and not root to install it (apt-get install debootstrap)"
    return None


def build(quiet: bool) -> int:
    """Run build.sh; returns its exit status (0: built or up to date, 3: prerequisite)."""
    proc = subprocess.run(
        [str(HERE / "build.sh")],
        stdout=subprocess.PIPE if quiet else None,
        stderr=subprocess.STDOUT if quiet else None,
        text=True,
        check=False,
    )
    if proc.returncode != 0 and quiet and proc.stdout:
        sys.stderr.write(proc.stdout[-4000:])
    return proc.returncode


def qemu_argv(share: Path, mem: int, smp: int) -> list[str]:
    return [
        QEMU,
        "-machine", "pc,accel=tcg",
        "-cpu", "max",
        "-smp", str(smp),
        "-m", str(mem),
        "-nodefaults", "-display", "none", "-no-reboot",
        "-serial", "stdio",
        "-kernel", str(OUT / "vmlinux"),
        "-initrd", str(OUT / "rootfs.cpio"),
        # lpj/no_timer_check/tsc=reliable: no calibration loops; mitigations=off: a test VM,
        # and syscalls are much cheaper under TCG without them
        "-append", "console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init lpj=8000000 "
                   "no_timer_check tsc=reliable cryptomgr.notests 8250.nr_uarts=1 "
                   "mitigations=off",
        "-fsdev", f"local,id=project,path={ROOT},security_model=none,readonly=on",
        "-device", "virtio-9p-pci,fsdev=project,mount_tag=project",
        "-fsdev", f"local,id=share,path={share},security_model=none",
        "-device", "virtio-9p-pci,fsdev=share,mount_tag=share",
    ]


def run(cmd: list[str], *, share: Path, env: list[str], timeout: float, mem: int, smp: int,
        quiet: bool) -> int:
    (share / "cmd.sh").write_text(f"exec {shlex.join(cmd)}\n")
    (share / "env").write_text("".join(f"{kv}\n" for kv in env))
    for stale in ("rc", "output.log"):
        (share / stale).unlink(missing_ok=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        qemu_argv(share, mem, smp), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True,
    )
    assert proc.stdout is not None
    rc: int | None = None
    timed_out = threading.Event()

    def on_timeout() -> None:
        timed_out.set()
        proc.kill()

    timer = threading.Timer(timeout, on_timeout)
    timer.start()
    try:
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").replace("\r", "")
            if not quiet:
                sys.stdout.write(line)
                sys.stdout.flush()
            m = EXIT_RE.search(line)
            if m:
                rc = int(m.group(1))
        proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        timer.cancel()
        proc.stdout.close()
    elapsed = time.monotonic() - t0
    if timed_out.is_set():
        print(f"rdma-guest: timed out after {timeout:.0f} s", file=sys.stderr)
        return TIMEOUT
    if rc is None:
        print(f"rdma-guest: the guest exited (QEMU status {proc.returncode}) without "
              "reporting an exit status", file=sys.stderr)
        return FAILED
    print(f"rdma-guest: exit {rc} after {elapsed:.1f} s (boot, run, power-off)",
          file=sys.stderr)
    return rc


def main(argv: list[str]) -> int:
    if "--" in argv:
        cut = argv.index("--")
        opts, cmd = argv[:cut], argv[cut + 1 :]
    else:
        opts, cmd = argv, []
    ap = argparse.ArgumentParser(prog="run.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--share", type=Path)
    ap.add_argument("--env", action="append", default=[])
    ap.add_argument("--timeout", type=float, default=1200.0)
    ap.add_argument("--mem", type=int, default=2048)
    ap.add_argument("--smp", type=int, default=2)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(opts)
    if not cmd:
        ap.error("give the command to run after --")
    for kv in args.env:
        if "=" not in kv or "\n" in kv:
            ap.error(f"--env takes KEY=VALUE, got {kv!r}")
    reason = unavailable_reason()
    if reason:
        return skip(reason)
    if not args.no_build:
        status = build(args.quiet)
        if status == 3:
            return skip("the guest image cannot be built here (see the message above)")
        if status != 0:
            print(f"rdma-guest: build.sh failed with status {status}", file=sys.stderr)
            return FAILED
    elif not (OUT / "rootfs.cpio").exists():
        return skip(f"no guest image in {OUT} and --no-build given")
    own = args.share is None
    share = Path(tempfile.mkdtemp(prefix="rdma-share-")) if own else args.share
    share.mkdir(parents=True, exist_ok=True)
    try:
        return run(cmd, share=share, env=args.env, timeout=args.timeout, mem=args.mem,
                   smp=args.smp, quiet=args.quiet)
    finally:
        if own:
            shutil.rmtree(share, ignore_errors=True)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main(sys.argv[1:]))
