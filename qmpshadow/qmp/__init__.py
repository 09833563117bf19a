"""asyncio QMP control over qemu.qmp: typed commands, events, timeouts.

See :class:`~qmpshadow.qmp.control.QmpControl` and ``docs/qemu-and-qmp.md``.
"""

from qmpshadow.qmp.control import DEFAULT_TIMEOUT, QmpControl, VmStatus
from qmpshadow.qmp.events import EventSubscription, QmpEvent
from qmpshadow.qmp.hmp import RamBlockInfo, parse_info_ramblock

__all__ = [
    "DEFAULT_TIMEOUT",
    "EventSubscription",
    "QmpControl",
    "QmpEvent",
    "RamBlockInfo",
    "VmStatus",
    "parse_info_ramblock",
]
