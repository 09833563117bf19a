"""QEMU process specs and launch: VM spec, primary/shadow command lines, accel, process.

See ``docs/qemu-and-qmp.md``. ``qmpshadow.qemu.testguest`` (the test guest kernel) lives
here too but is not re-exported.
"""

from qmpshadow.qemu.accel import AccelChoice, detect_accel, probe_kvm
from qmpshadow.qemu.argv import QEMU_BINARY, RunPaths, primary_argv, qemu_opt, shadow_argv
from qmpshadow.qemu.process import QemuProcess, launch
from qmpshadow.qemu.spec import DEFAULT_BACKEND_ID, MemorySpec, VmSpec

__all__ = [
    "DEFAULT_BACKEND_ID",
    "QEMU_BINARY",
    "AccelChoice",
    "MemorySpec",
    "QemuProcess",
    "RunPaths",
    "VmSpec",
    "detect_accel",
    "launch",
    "primary_argv",
    "probe_kvm",
    "qemu_opt",
    "shadow_argv",
]
