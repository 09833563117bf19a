"""Synthetic migration streams built with the project's writer (for unit tests)."""

from __future__ import annotations

import json
import random

from qmpshadow.migstream.constants import ColoMessage, Command, RamFlag
from qmpshadow.migstream.events import (
    ColoMessageEvent,
    ColoVmstate,
    CommandSection,
    Configuration,
    DeviceSection,
    Eof,
    Event,
    Header,
    RamBlockDecl,
    RamEos,
    RamMemSize,
    RamRecords,
    RamXbzrle,
    SectionEnd,
    SectionFooter,
    SectionPart,
    SectionStart,
    Subsection,
    VmDescription,
    encode_capabilities,
)
from qmpshadow.migstream.writer import StreamWriter
from qmpshadow.migstream.xbzrle import xbzrle_encode

PS = 4096


def records(section: int, recs: list[tuple[int, int, str, bytes]]) -> RamRecords:
    """RamRecords from (flags, offset, block, payload) with payloads laid out in ``data``."""
    data = bytearray()
    out = []
    for flags, off, blk, payload in recs:
        out.append((flags, off, blk, len(data)))
        data += payload
    return RamRecords(section, bytes(data), out, PS)


def devices(start_id: int = 10) -> list[DeviceSection]:
    rng = random.Random(7)
    names = [("timer", 0), ("cpu", 0), ("apic", 0), ("dma", 0), ("dma", 1), ("ps2kbd", 0)]
    out = []
    for i, (name, inst) in enumerate(names):
        n = rng.randrange(0, 300)
        payload = bytes(rng.randrange(256) for _ in range(n))
        if name == "cpu":  # payload that contains a fake footer of its own id
            payload = payload[:10] + b"\x7e" + (start_id + i).to_bytes(4, "big") + payload[10:]
        out.append(DeviceSection(start_id + i, name, inst, 1, payload))
    return out


def vmdesc_for(devs: list[DeviceSection]) -> VmDescription:
    doc = {"page_size": PS, "devices": [
        {"name": d.idstr, "instance_id": d.instance_id, "vmsd_name": d.idstr,
         "version": d.version_id, "fields": []} for d in devs]}
    return VmDescription(json.dumps(doc).encode())


def precopy_events(*, ignore_shared: bool = False, colo: bool = False,
                   checkpoints: int = 2) -> list[Event]:
    """A small but complete stream touching every feature the parser knows."""
    rng = random.Random(42)
    main_len, rom_len = 16 * PS, 2 * PS
    gpa = (lambda v: v) if ignore_shared else (lambda v: None)
    caps = ("x-ignore-shared",) if ignore_shared else ()
    subs = (Subsection("configuration/capabilities", 1, encode_capabilities(caps)),) if caps \
        else ()
    evs: list[Event] = [Header(3), Configuration("pc-i440fx-7.2", subs)]
    if colo:
        evs.append(CommandSection(Command.ENABLE_COLO, b""))
    evs += [
        SectionStart(2, "ram", 0, 4),
        RamMemSize(main_len + rom_len, (RamBlockDecl("pc.ram", main_len, gpa(0)),
                                        RamBlockDecl("pc.rom", rom_len, gpa(0xC0000)))),
        RamEos(2), SectionFooter(2),
    ]
    pages = {i: bytes(rng.randrange(256) for _ in range(PS)) for i in range(0, 16, 3)}
    recs = []
    first = True
    for i in range(16):
        cont = 0 if first else RamFlag.CONTINUE
        first = False
        if i in pages:
            recs.append((RamFlag.PAGE | cont, i * PS, "pc.ram", pages[i]))
        else:
            recs.append((RamFlag.ZERO | cont, i * PS, "pc.ram", b"\x00"))
    recs.append((RamFlag.PAGE, 0, "pc.rom", bytes(range(256)) * 16))
    recs.append((RamFlag.ZERO | RamFlag.CONTINUE, PS, "pc.rom", b"\x00"))
    evs += [SectionPart(2, "ram"), records(2, recs), RamEos(2), SectionFooter(2)]
    # an XBZRLE update of page 3
    new3 = bytearray(pages[3])
    new3[100:110] = b"0123456789"
    new3[4000] ^= 0xFF
    evs += [SectionEnd(2, "ram"),
            RamXbzrle(2, RamFlag.XBZRLE, "pc.ram", 3 * PS, xbzrle_encode(pages[3], bytes(new3))),
            records(2, [(RamFlag.PAGE | RamFlag.CONTINUE, 5 * PS, "pc.ram", b"\xab" * PS)]),
            RamEos(2), SectionFooter(2)]
    devs = devices()
    evs += devs
    evs += [Eof(), vmdesc_for(devs)]
    if colo:
        for cp in range(1, checkpoints + 1):
            evs += [
                ColoMessageEvent(ColoMessage.CHECKPOINT_REQUEST),
                ColoMessageEvent(ColoMessage.VMSTATE_SEND),
                SectionEnd(2, "ram"),
                records(2, [(RamFlag.PAGE, (cp % 16) * PS, "pc.ram", bytes([cp]) * PS),
                            (RamFlag.ZERO | RamFlag.CONTINUE, 7 * PS, "pc.ram", b"\x00")]),
                RamEos(2), SectionFooter(2), Eof(),
            ]
            vm = ColoVmstate(cp, tuple(devices()))
            size = len(StreamWriter().write(vm))
            evs += [ColoMessageEvent(ColoMessage.VMSTATE_SIZE, size), vm]
    return evs


def stream_bytes(evs: list[Event]) -> bytes:
    return StreamWriter().write_all(evs)
