"""Sans-I/O COLO secondary endpoint: which return-path messages answer which stream events.

The primary (stock QEMU with ``x-colo``) waits for CHECKPOINT_READY after the initial
stream, then per checkpoint sends REQUEST and waits for REPLY, sends its state and waits for
VMSTATE_RECEIVED and VMSTATE_LOADED. :class:`ColoSecondary` turns parser events into the
bytes to write back. Holding an answer back (``sync`` ack mode) is the caller's choice:
:meth:`ColoSecondary.on_event` returns the answers, the caller decides when to send them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import StreamFormatError
from ._input import Input
from .constants import COLO_RETURN, ColoMessage
from .events import ColoMessageEvent, ColoVmstate, Event, VmDescription


def encode_colo(msg: ColoMessage, value: int | None = None) -> bytes:
    """Bytes of one COLO message (be32, plus be64 value for VMSTATE_SIZE)."""
    out = struct.pack(">I", int(msg))
    if value is not None:
        out += struct.pack(">Q", value)
    return out


@dataclass
class ColoSecondary:
    """Answers of a COLO secondary for a stream whose primary enabled COLO."""

    ready_sent: bool = False
    checkpoints: int = 0

    def on_event(self, ev: Event, *, colo_enabled: bool) -> list[ColoMessage]:
        """Return-path messages that ``ev`` calls for (empty for most events)."""
        if isinstance(ev, VmDescription) and colo_enabled and not self.ready_sent:
            self.ready_sent = True
            return [ColoMessage.CHECKPOINT_READY]
        if isinstance(ev, ColoMessageEvent) and ev.message == ColoMessage.CHECKPOINT_REQUEST:
            return [ColoMessage.CHECKPOINT_REPLY]
        if isinstance(ev, ColoVmstate):
            self.checkpoints += 1
            return [ColoMessage.VMSTATE_RECEIVED, ColoMessage.VMSTATE_LOADED]
        return []


class ReturnPathParser:
    """Parse the secondary → primary direction of a COLO session (for recording/inspection)."""

    def __init__(self) -> None:
        self._in = Input()

    def receive_data(self, data: bytes) -> None:
        """Feed bytes; ``b""`` marks the end."""
        self._in.feed(data)

    def next_message(self) -> ColoMessage | None:
        """The next message or None when more bytes are needed.

        Raises StreamFormatError for a value that is not a return-path COLO message.
        """
        if not self._in.ensure(4):
            return None
        value = self._in.be(0, 4)
        try:
            msg = ColoMessage(value)
        except ValueError:
            raise StreamFormatError(f"unknown COLO message {value} on the return path",
                                    offset=self._in.offset) from None
        if msg not in COLO_RETURN:
            raise StreamFormatError(f"COLO message {msg.name} does not belong on the return "
                                    "path", offset=self._in.offset)
        self._in.skip(4)
        return msg
