"""Sans-I/O codec of QEMU's migration stream and COLO framing: parser, writer, events."""

from .events import NEED_DATA, Event
from .parser import Limits, StreamParser
from .writer import StreamWriter

__all__ = ["NEED_DATA", "Event", "Limits", "StreamParser", "StreamWriter"]
