"""The one error tree of qmpshadow.

Every error the package raises on purpose derives from :class:`QmpShadowError`. Messages say
what was expected, what came, and what to do. ``asyncio.CancelledError`` is never wrapped.
"""

from __future__ import annotations


class QmpShadowError(Exception):
    """Root of every error qmpshadow raises on purpose."""


class ConfigError(QmpShadowError):
    """A VM spec, option or argument is invalid."""


class StreamFormatError(QmpShadowError):
    """Bytes of a QEMU migration stream (or COLO framing) do not follow the format.

    Carries the absolute stream ``offset`` of the offending bytes and, where known, the
    ``section`` (idstr or description) being parsed.
    """

    def __init__(self, message: str, *, offset: int, section: str | None = None) -> None:
        where = f"at offset {offset}"
        if section:
            where += f" in section {section!r}"
        super().__init__(f"{message} ({where})")
        self.offset = offset
        self.section = section
        self.reason = message


class StreamUnsupportedError(StreamFormatError):
    """Well-formed stream content that qmpshadow deliberately does not handle."""


class QemuError(QmpShadowError):
    """A QEMU process could not be launched, became unreachable or exited unexpectedly."""


class AccelError(QemuError):
    """The requested accelerator (e.g. KVM) is not usable on this host."""


class QemuExitedError(QemuError):
    """A QEMU process exited while it was expected to run (e.g. during start).

    Carries the ``returncode`` (negative: killed by that signal) and the ``stderr_tail``
    (last lines QEMU wrote to its log), which usually names the offending option.
    """

    def __init__(self, message: str, *, returncode: int | None, stderr_tail: str) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr_tail = stderr_tail


class QmpError(QmpShadowError):
    """QMP transport failure (connect, disconnect, timeout)."""


class QmpCommandError(QmpError):
    """QEMU answered a QMP command with an error; ``error_class`` is QMP's class."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP command {command!r} failed: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QmpTimeoutError(QmpError):
    """A QMP command or event wait did not finish in time."""


class TransportError(QmpShadowError):
    """A replication link failed (connect, authentication, peer death, corruption)."""


class FrameError(QmpShadowError):
    """A delta frame is malformed, corrupt (checksum) or from a fenced generation."""


class FrameFormatError(FrameError):
    """Delta-frame bytes are malformed: bad magic/version/type, out-of-bounds length or field.

    Carries the absolute ``offset`` in the frame stream (or in the page-record payload, for
    the page codec) of the offending bytes. The stream cannot be resynchronised after it:
    drop the connection and start a new session (the sender then resets its caches).
    """

    def __init__(self, message: str, *, offset: int) -> None:
        super().__init__(f"{message} (at offset {offset})")
        self.offset = offset
        self.reason = message


class FrameChecksumError(FrameFormatError):
    """A frame's header or payload checksum does not match its bytes (corruption in transit)."""


class FencedFrameError(FrameError):
    """A frame carries a generation (fencing token) older than the newest one seen.

    ``frame_generation`` is the frame's, ``current_generation`` the receiver's. The sender is
    a deposed primary: it must stop, never retry.
    """

    def __init__(self, frame_generation: int, current_generation: int) -> None:
        super().__init__(
            f"frame from generation {frame_generation} refused: generation "
            f"{current_generation} is current (the sender was fenced; stop it)"
        )
        self.frame_generation = frame_generation
        self.current_generation = current_generation


class MigrationError(QmpShadowError):
    """A live migration failed; the source was left running."""


class DiskError(QmpShadowError):
    """Disk replication failed: a block job, the backup target or a disk image."""


class NbdProtocolError(DiskError):
    """An NBD peer broke the protocol (bad magic, a length beyond the bounds)."""
