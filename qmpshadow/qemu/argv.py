"""QEMU command lines for the roles of a VM: primary and shadow.

Both roles share the device model built from the :class:`~qmpshadow.qemu.spec.VmSpec`;
they differ only in where RAM lives and in whether the guest runs:

- **primary**: RAM as the spec says (plain ``-m``, a named ``memory-backend-ram``, or a
  shared ``memory-backend-file``); the guest runs (or, with ``incoming=True``, waits as a
  plain live-migration destination).
- **shadow**: RAM is always a shared ``memory-backend-file`` whose id equals the
  primary's RAMBlock idstr (``spec.memory.backend_id``), mapped from the replica file;
  started ``-S -incoming defer`` so that promotion is ``migrate-incoming`` then ``cont``.

Every process gets two QMP sockets because a QMP unix socket serves one client at a
time: ``qmp.sock`` is owned by :class:`~qmpshadow.qemu.process.QemuProcess`, ``qmp2.sock``
is free for anyone else (an agent, a human with ``socat``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from qmpshadow.disk.spec import disk_argv
from qmpshadow.errors import ConfigError
from qmpshadow.qemu.accel import AccelChoice
from qmpshadow.qemu.nics import nic_argv, serial_socket_argv
from qmpshadow.qemu.spec import DEFAULT_BACKEND_ID, VmSpec

QEMU_BINARY = "qemu-system-x86_64"

# sockaddr_un.sun_path is 108 bytes including the terminating NUL; QEMU refuses longer
# paths with a message that does not name the limit.
_MAX_SOCKET_PATH = 107


@dataclass(frozen=True, slots=True)
class RunPaths:
    """Per-process run directory: QMP sockets, logs and pidfile of one QEMU.

    Raises:
        ConfigError: (at construction) a socket path would exceed the 107-byte unix
            socket limit.
    """

    root: Path

    def __post_init__(self) -> None:
        for sock in (self.qmp_sock, self.qmp2_sock):
            size = len(os.fsencode(sock))
            if size > _MAX_SOCKET_PATH:
                raise ConfigError(
                    f"run directory {str(self.root)!r}: socket path {str(sock)!r} is "
                    f"{size} bytes, unix sockets allow at most {_MAX_SOCKET_PATH}; use a "
                    "shorter run directory (e.g. under /run/qmpshadow or /tmp)"
                )

    @classmethod
    def create(cls, root: str | os.PathLike[str]) -> RunPaths:
        """Make ``root`` (and parents) and return its paths.

        Raises:
            ConfigError: the directory cannot be created or its socket paths are too long.
        """
        paths = cls(Path(root).absolute())
        try:
            paths.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(
                f"run directory {str(paths.root)!r}: cannot create it: {err}"
            ) from err
        return paths

    @property
    def qmp_sock(self) -> Path:
        """QMP socket owned by :class:`~qmpshadow.qemu.process.QemuProcess`."""
        return self.root / "qmp.sock"

    @property
    def qmp2_sock(self) -> Path:
        """Second QMP socket, free for another client."""
        return self.root / "qmp2.sock"

    @property
    def serial_log(self) -> Path:
        """Default serial console log (``serial = true``)."""
        return self.root / "serial.log"

    @property
    def stderr_log(self) -> Path:
        """QEMU's stdout and stderr."""
        return self.root / "stderr.log"

    @property
    def pidfile(self) -> Path:
        """QEMU's ``-pidfile`` (removed by QEMU on a clean exit only)."""
        return self.root / "qemu.pid"


def qemu_opt(value: str | os.PathLike[str]) -> str:
    """Escape a value for QEMU's ``key=value,...`` option syntax (commas doubled)."""
    return os.fspath(value).replace(",", ",,")


def _accel(accel: AccelChoice | str) -> Literal["kvm", "tcg"]:
    name = accel.name if isinstance(accel, AccelChoice) else accel
    if name == "kvm":
        return "kvm"
    if name == "tcg":
        return "tcg"
    raise ConfigError(
        f"accel: expected a resolved accelerator 'kvm' or 'tcg', got {name!r}; resolve "
        "'auto' with qmpshadow.qemu.accel.detect_accel() first"
    )


def _common(spec: VmSpec, accel: AccelChoice | str, binary: str, machine: str) -> list[str]:
    return [
        binary,
        "-name", f"guest={spec.name}",
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-machine", machine,
        "-accel", _accel(accel),
        "-cpu", spec.cpu,
        "-smp", str(spec.vcpus),
        "-m", f"{spec.memory.size_mib}M",
    ]


def _tail(spec: VmSpec, run: RunPaths, *, shadow: bool = True) -> list[str]:
    # shadow=True: serial straight to its log and NICs without redirectors
    oc = spec.output_commit and not shadow
    argv = [
        *nic_argv(spec.nics, run.root, shadow=shadow, output_commit=oc),
        "-qmp", f"unix:{qemu_opt(run.qmp_sock)},server=on,wait=off",
        "-qmp", f"unix:{qemu_opt(run.qmp2_sock)},server=on,wait=off",
        "-pidfile", os.fspath(run.pidfile),
    ]
    if spec.serial is not False and oc:
        argv += serial_socket_argv(run.root)
    elif spec.serial is not False:
        log = run.serial_log if spec.serial is True else spec.serial
        argv += [
            "-chardev", f"file,id=serial0,path={qemu_opt(log)}",
            "-serial", "chardev:serial0",
        ]
    if spec.kernel is not None:
        # -kernel/-append/-initrd are plain strings to QEMU, not key=value lists: no
        # comma escaping (and -initrd uses commas to separate multiboot modules).
        argv += ["-kernel", os.fspath(spec.kernel)]
        if spec.kernel_args is not None:
            argv += ["-append", spec.kernel_args]
        if spec.initrd is not None:
            argv += ["-initrd", os.fspath(spec.initrd)]
    argv += list(spec.extra_args)
    return argv


def _file_backend(backend_id: str, size_mib: int, mem_path: Path) -> list[str]:
    return [
        "-object",
        f"memory-backend-file,id={backend_id},size={size_mib}M,"
        f"mem-path={qemu_opt(mem_path)},share=on",
    ]


def primary_argv(
    spec: VmSpec,
    run: RunPaths,
    *,
    accel: AccelChoice | str,
    incoming: bool = False,
    binary: str = QEMU_BINARY,
) -> list[str]:
    """Command line of the primary (the VM that runs the guest).

    RAM: ``backend = "ram"`` with the default id is a plain ``-m`` (RAMBlock
    ``pc.ram``); with another id a ``memory-backend-ram`` of that id; ``backend =
    "file"`` a shared ``memory-backend-file`` on ``mem_path``. ``incoming=True`` adds
    ``-S -incoming defer`` (a plain live-migration destination with the same RAM layout).

    Raises:
        ConfigError: ``accel`` is not a resolved accelerator ('kvm' or 'tcg').
    """
    mem = spec.memory
    objects: list[str] = []
    machine = spec.machine
    if mem.backend == "file":
        if mem.mem_path is None:  # MemorySpec refuses this; kept for the type checker
            raise ConfigError("memory.mem_path: backend = 'file' needs mem_path")
        objects = _file_backend(mem.backend_id, mem.size_mib, mem.mem_path)
        machine += f",memory-backend={mem.backend_id}"
    elif mem.backend_id != DEFAULT_BACKEND_ID:
        objects = ["-object", f"memory-backend-ram,id={mem.backend_id},size={mem.size_mib}M"]
        machine += f",memory-backend={mem.backend_id}"
    argv = _common(spec, accel, binary, machine) + objects + _tail(spec, run, shadow=False)
    argv += disk_argv(spec.disks, "primary")
    if incoming:
        argv += ["-S", "-incoming", "defer"]
    return argv


def shadow_argv(
    spec: VmSpec,
    run: RunPaths,
    *,
    accel: AccelChoice | str,
    mem_path: str | os.PathLike[str],
    binary: str = QEMU_BINARY,
) -> list[str]:
    """Command line of a shadow: same device model, RAM mapped shared from ``mem_path``.

    The RAM backend id is the primary's RAMBlock idstr (``spec.memory.backend_id``;
    ``pc.ram`` works as an object id only together with ``-machine memory-backend``, which
    is what is emitted). Starts paused in ``inmigrate`` (``-S -incoming defer``).

    Raises:
        ConfigError: ``accel`` is not resolved, or ``mem_path`` is the primary's own RAM
            file (the shadow would share the live guest's memory).
    """
    mem = spec.memory
    shadow_mem = Path(mem_path)
    if mem.mem_path is not None and _same_file(shadow_mem, mem.mem_path):
        raise ConfigError(
            f"shadow mem_path {str(shadow_mem)!r} is the primary's RAM file; expected a "
            "separate replica file (e.g. /dev/shm/<vm>.shadow.ram)"
        )
    machine = f"{spec.machine},memory-backend={mem.backend_id}"
    argv = _common(spec, accel, binary, machine)
    argv += _file_backend(mem.backend_id, mem.size_mib, shadow_mem)
    argv += _tail(spec, run)
    # inactive until the incoming load completes: QEMU does not write the image before
    argv += disk_argv(spec.disks, "shadow")
    argv += ["-S", "-incoming", "defer"]
    return argv


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return a.absolute() == b.absolute()
