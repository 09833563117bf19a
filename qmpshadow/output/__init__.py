"""Output commit: the guest's network frames and serial bytes held by the source agent
until the epoch that produced them is committed at the shadow (docs/output-commit.md).

- :mod:`.core`: sans-I/O redirector framing (be32 length + Ethernet frame) and the
  hold-until-commit release queue.
- :mod:`.policy`: the adaptive epoch-length policy.
- :mod:`.shell`: the asyncio shell that reads QEMU's chardev sockets and writes released
  output back.
"""

from .core import FrameDecoder, HoldQueue, encode_frames
from .policy import EpochPolicy

__all__ = ["EpochPolicy", "FrameDecoder", "HoldQueue", "encode_frames"]
