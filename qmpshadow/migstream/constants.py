"""Wire constants of QEMU 7.2's migration stream and COLO framing (migration/savevm.c, ram.c)."""

from __future__ import annotations

from enum import IntEnum

QEMU_VM_FILE_MAGIC = 0x5145564D  # "QEVM"
QEMU_VM_FILE_VERSION = 3


class SectionType(IntEnum):
    EOF = 0x00
    START = 0x01
    PART = 0x02
    END = 0x03
    FULL = 0x04
    SUBSECTION = 0x05
    VMDESCRIPTION = 0x06
    CONFIGURATION = 0x07
    COMMAND = 0x08
    FOOTER = 0x7E


class Command(IntEnum):
    """MIG_CMD_* values of QEMU_VM_COMMAND sections."""

    INVALID = 0
    OPEN_RETURN_PATH = 1
    PING = 2
    POSTCOPY_ADVISE = 3
    POSTCOPY_LISTEN = 4
    POSTCOPY_RUN = 5
    POSTCOPY_RAM_DISCARD = 6
    PACKAGED = 7
    ENABLE_COLO = 8
    POSTCOPY_RESUME = 9
    RECV_BITMAP = 10


class RamFlag:
    """RAM_SAVE_FLAG_* bits in the low bits of each RAM record's be64 header."""

    FULL = 0x01  # obsolete: never sent by 7.2
    ZERO = 0x02
    MEM_SIZE = 0x04
    PAGE = 0x08
    EOS = 0x10
    CONTINUE = 0x20
    XBZRLE = 0x40
    HOOK = 0x80  # RDMA only
    COMPRESS_PAGE = 0x100


class ColoMessage(IntEnum):
    """COLOMessage (qapi/migration.json), be32 on the stream and on its return path."""

    CHECKPOINT_READY = 0
    CHECKPOINT_REQUEST = 1
    CHECKPOINT_REPLY = 2
    VMSTATE_SEND = 3
    VMSTATE_SIZE = 4
    VMSTATE_RECEIVED = 5
    VMSTATE_LOADED = 6


#: Messages the primary sends on the forward stream.
COLO_FORWARD = frozenset(
    {ColoMessage.CHECKPOINT_REQUEST, ColoMessage.VMSTATE_SEND, ColoMessage.VMSTATE_SIZE}
)
#: Messages the secondary sends back on the return path.
COLO_RETURN = frozenset(
    {
        ColoMessage.CHECKPOINT_READY,
        ColoMessage.CHECKPOINT_REPLY,
        ColoMessage.VMSTATE_RECEIVED,
        ColoMessage.VMSTATE_LOADED,
    }
)

XBZRLE_ENCODING_FLAG = 0x1
DEFAULT_PAGE_SIZE = 4096
