"""Accelerator choice: KVM when it really works here, else TCG, with the reason.

``/dev/kvm`` existing is not enough (permissions, a module without hardware support, a
nested hypervisor that refuses VM creation), so the probe opens it read-write, checks
``KVM_GET_API_VERSION`` and creates (then closes) a VM. ``QMPSHADOW_ACCEL=kvm|tcg``
overrides ``prefer="auto"``; an explicit ``prefer`` wins over the environment.

A KVM that passes the probe can still be limited: on this project's test host it is a
nested software implementation where ``-cpu host`` aborts QEMU, hence the ``qemu64``
default CPU model.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from typing import Literal

from qmpshadow.errors import AccelError, ConfigError

ENV_VAR = "QMPSHADOW_ACCEL"
KVM_DEVICE = "/dev/kvm"

# From <linux/kvm.h>: _IO(KVMIO=0xAE, nr). The API version has been 12 since Linux 2.6.22.
_KVM_GET_API_VERSION = 0xAE00
_KVM_CREATE_VM = 0xAE01
_KVM_API_VERSION = 12

ResolvedAccel = Literal["kvm", "tcg"]


@dataclass(frozen=True, slots=True)
class AccelChoice:
    """The accelerator to pass to ``-accel`` and why it was chosen."""

    name: ResolvedAccel
    reason: str

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


def probe_kvm(device: str = KVM_DEVICE) -> str | None:
    """Check that KVM is usable: ``None`` when it is, else the reason it is not.

    Never raises for an unusable KVM (that is the answer, not an error).
    """
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        return f"cannot open {device} read-write: {err.strerror or err}"
    try:
        try:
            version = fcntl.ioctl(fd, _KVM_GET_API_VERSION, 0)
        except OSError as err:
            return f"KVM_GET_API_VERSION on {device} failed: {err.strerror or err}"
        if version != _KVM_API_VERSION:
            return (
                f"KVM_GET_API_VERSION on {device} returned {version}, expected "
                f"{_KVM_API_VERSION}"
            )
        try:
            vm_fd = fcntl.ioctl(fd, _KVM_CREATE_VM, 0)
        except OSError as err:
            return f"KVM_CREATE_VM on {device} failed: {err.strerror or err}"
        os.close(vm_fd)
        return None
    finally:
        os.close(fd)


def detect_accel(prefer: str = "auto", *, device: str = KVM_DEVICE) -> AccelChoice:
    """Choose the accelerator for ``prefer`` ("auto", "kvm" or "tcg").

    With "auto", ``$QMPSHADOW_ACCEL`` (kvm or tcg) decides when set; otherwise KVM when
    :func:`probe_kvm` passes, else TCG with the probe's reason.

    Raises:
        ConfigError: ``prefer`` or ``$QMPSHADOW_ACCEL`` is not a known accelerator.
        AccelError: KVM was asked for explicitly (argument or environment) and is not
            usable here; the message says why and suggests tcg.
    """
    if prefer not in ("auto", "kvm", "tcg"):
        raise ConfigError(f"accel: expected 'auto', 'kvm' or 'tcg', got {prefer!r}")
    source = "requested"
    if prefer == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env:
            if env not in ("kvm", "tcg", "auto"):
                raise ConfigError(
                    f"${ENV_VAR}: expected 'kvm', 'tcg' or 'auto', got {env!r}; "
                    f"unset it to detect automatically"
                )
            prefer = env
            source = f"requested via ${ENV_VAR}={env}"
    if prefer == "tcg":
        return AccelChoice("tcg", source)
    reason = probe_kvm(device)
    if prefer == "kvm":
        if reason is not None:
            raise AccelError(
                f"KVM was {source} but is not usable: {reason}. Use accel 'tcg' "
                f"(or {ENV_VAR}=tcg), or fix access to {device}"
            )
        return AccelChoice("kvm", f"{source}; {device} usable")
    if reason is None:
        return AccelChoice("kvm", f"auto: {device} usable (API {_KVM_API_VERSION}, VM created)")
    return AccelChoice("tcg", f"auto: KVM unusable: {reason}")
