"""The NBD server core (sans-I/O): handshake, writes, bounds, fed whole and byte by byte."""

from __future__ import annotations

import struct

import pytest

from qmpshadow.disk import nbd
from qmpshadow.disk.nbd import NEED_DATA, Disconnect, Flush, NbdServerCore, Ready, Write
from qmpshadow.errors import NbdProtocolError

SIZE = 1 << 20


def _opt(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", nbd.IHAVEOPT, opt, len(data)) + data


def _req(cmd: int, handle: int, offset: int, length: int, data: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, cmd, handle, offset, length) + data


def _client() -> bytes:
    go = struct.pack(">I", 5) + b"disk0" + struct.pack(">H", 0)
    return (struct.pack(">I", nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES)
            + _opt(8) + _opt(nbd.OPT_GO, go)
            + _req(nbd.CMD_WRITE, 1, 4096, 3, b"abc") + _req(nbd.CMD_READ, 2, 0, 512)
            + _req(nbd.CMD_FLUSH, 3, 0, 0) + _req(nbd.CMD_DISC, 4, 0, 0))


def _events(core: NbdServerCore, chunks: list[bytes]) -> list[object]:
    out: list[object] = []
    for c in [*chunks, b""]:
        core.receive_data(c)
        while (ev := core.next_event()) is not NEED_DATA:
            out.append(ev)
            if isinstance(ev, Write | Flush):
                core.reply(ev.handle)
    return out


@pytest.mark.parametrize("split", [False, True])
def test_handshake_write_flush_disconnect(split: bool) -> None:
    data = _client()
    core = NbdServerCore("disk0", SIZE)
    greeting = core.data_to_send()
    assert greeting[:16] == struct.pack(">QQ", nbd.NBDMAGIC, nbd.IHAVEOPT)
    chunks = [data[i : i + 1] for i in range(len(data))] if split else [data]
    evs = _events(core, chunks)
    assert evs == [Ready("disk0"), Write(1, 4096, b"abc"), Flush(3), Disconnect(clean=True)]
    out = core.data_to_send()
    # structured replies refused, GO answered with INFO (size) + ACK, read refused (EINVAL)
    assert struct.pack(">QIII", nbd.REPLY_MAGIC, 8, nbd.REP_ERR_UNSUP, 0) in out
    assert struct.pack(">HQH", 0, SIZE, nbd.TFLAG_HAS_FLAGS | nbd.TFLAG_SEND_FLUSH) in out
    assert struct.pack(">IIQ", nbd.SIMPLE_REPLY_MAGIC, nbd.EINVAL, 2) in out
    assert struct.pack(">IIQ", nbd.SIMPLE_REPLY_MAGIC, 0, 1) in out


def test_write_outside_the_export_and_bad_magic_are_refused() -> None:
    core = NbdServerCore("disk0", SIZE)
    go = struct.pack(">I", 0) + struct.pack(">H", 0)
    core.receive_data(struct.pack(">I", 3) + _opt(nbd.OPT_GO, go)
                      + _req(nbd.CMD_WRITE, 1, SIZE - 1, 2))
    assert core.next_event() == Ready("disk0")
    with pytest.raises(NbdProtocolError, match="outside the export"):
        core.next_event()
    core = NbdServerCore("disk0", SIZE)
    core.receive_data(struct.pack(">I", 3) + struct.pack(">QII", 1, 1, 0))
    with pytest.raises(NbdProtocolError, match="option magic"):
        core.next_event()
    core = NbdServerCore("disk0", SIZE)
    core.receive_data(struct.pack(">I", 3) + struct.pack(">QII", nbd.IHAVEOPT, 7, 1 << 30))
    with pytest.raises(NbdProtocolError, match="at most"):
        core.next_event()


def test_eof_mid_request_is_an_unclean_disconnect() -> None:
    core = NbdServerCore("disk0", SIZE)
    assert _events(core, [struct.pack(">I", 3)[:2]]) == [Disconnect(clean=False)]
