"""Sans-I/O parser of QEMU 7.2 migration streams, COLO checkpoints included.

Feed bytes with :meth:`StreamParser.receive_data` (``b""`` at end of input) and pull events
with :meth:`StreamParser.next_event` until it returns :data:`NEED_DATA`. Nothing here does
I/O. Every length read from the stream is bounded; bad input raises
:class:`~qmpshadow.errors.StreamFormatError` naming the absolute offset and the section.

Device (SECTION_FULL) sections are not self-delimiting. They are held until their end is
known: the trailing VMDESCRIPTION of a precopy stream, the size of a COLO VMSTATE_SIZE
message, or the end of input. They are then split at their footers (checked against the
vmdesc's device list when there is one).
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from types import ModuleType

from ..errors import StreamFormatError, StreamUnsupportedError
from . import ramscan
from ._input import Input
from .constants import (
    COLO_FORWARD,
    DEFAULT_PAGE_SIZE,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    XBZRLE_ENCODING_FLAG,
    ColoMessage,
    Command,
    RamFlag,
    SectionType,
)
from .events import (
    NEED_DATA,
    ColoMessageEvent,
    ColoVmstate,
    CommandSection,
    Configuration,
    DeviceSection,
    EndOfStream,
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
    _NeedData,
)
from .xbzrle import xbzrle_runs


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what the parser accepts and holds."""

    max_device_state: int = 256 << 20  # device sections of one stream or checkpoint
    max_vmdesc: int = 16 << 20
    max_ram_blocks: int = 1024
    max_capabilities: int = 64
    max_machine_type: int = 256
    max_records_per_event: int = 4096


_S_HEADER = "header"
_S_TOP = "section type"
_S_RAM = "RAM records"
_S_FOOTER = "section footer"
_S_DEVICES = "device sections"
_S_AFTER_EOF = "after EOF"
_S_COLO = "COLO message"
_S_COLO_VMSTATE = "COLO device state"
_S_DONE = "end of stream"

_KNOWN_FLAGS = (
    RamFlag.ZERO
    | RamFlag.MEM_SIZE
    | RamFlag.PAGE
    | RamFlag.EOS
    | RamFlag.CONTINUE
    | RamFlag.XBZRLE
    | RamFlag.HOOK
    | RamFlag.COMPRESS_PAGE
)


class StreamParser:
    """Bytes of one migration stream in, :mod:`events <qmpshadow.migstream.events>` out."""

    def __init__(self, limits: Limits | None = None, *, impl: ModuleType | None = None) -> None:
        """``impl`` picks a twin of the RAM hot loop (default: the live one)."""
        self.limits = limits or Limits()
        self._scan = (impl or ramscan).scan_records
        self._in = Input()
        self._state = _S_HEADER
        self._pending: deque[Event] = deque()
        self.page_size = DEFAULT_PAGE_SIZE
        self.ignore_shared = False
        self.colo_enabled = False
        self.postcopy_advised = False
        self.configuration: Configuration | None = None
        self.blocks: dict[bytes, tuple[str, int]] = {}
        self.block_order: list[RamBlockDecl] = []
        self._cur_block: tuple[str, int] | None = None
        self._sections: dict[int, str] = {}  # iterable section id -> idstr
        self._section_id = 0
        self._section_name: str | None = None
        self._section_is_start = False
        self._in_checkpoint = False
        self.checkpoints = 0
        self._colo_size = 0
        self._colo_layout: _Layout = ()
        # device-region accumulation
        self._dev = bytearray()
        self._dev_offset = 0
        self._dev_scan = 0
        self._end_emitted = False

    # -- public API -------------------------------------------------------------------
    @property
    def offset(self) -> int:
        """Absolute offset of the next byte the parser will read."""
        return self._in.offset

    @property
    def state(self) -> str:
        """What the parser expects next (for messages and tests)."""
        return self._state

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed received bytes; ``b""`` means the input ended."""
        self._in.feed(data)

    def colo_vmstate_buffered(self) -> bool:
        """A COLO checkpoint's device state (announced by VMSTATE_SIZE) is wholly received
        and not parsed yet: the next event is its :class:`ColoVmstate` (or an error)."""
        return (self._state == _S_COLO_VMSTATE and not self._pending
                and self._in.available() >= self._colo_size)

    def next_event(self) -> Event | _NeedData:
        """The next event, or NEED_DATA. Raises StreamFormatError on bad input."""
        while True:
            if self._pending:
                return self._pending.popleft()
            ev = self._step()
            if ev is not None:
                return ev

    def events(self) -> list[Event]:
        """All events available now (convenience for tests and tools)."""
        out: list[Event] = []
        while True:
            ev = self.next_event()
            if isinstance(ev, _NeedData):
                return out
            out.append(ev)

    # -- helpers ----------------------------------------------------------------------
    def _error(self, msg: str, k: int = 0, cls: type[StreamFormatError] = StreamFormatError
               ) -> StreamFormatError:
        return cls(msg, offset=self._in.offset + k, section=self._section_name)

    def _need(self, n: int) -> bool:
        """Ensure n bytes; at end of input, a shortfall is a truncation error."""
        if self._in.ensure(n):
            return True
        if self._in.ended:
            raise self._error(
                f"truncated stream: expected {n} more bytes for {self._state}, "
                f"got {self._in.available()} before the end of input"
            )
        return False

    # -- state machine ----------------------------------------------------------------
    def _step(self) -> Event | _NeedData | None:
        st = self._state
        if st == _S_RAM:
            return self._ram()
        if st == _S_TOP:
            return self._top()
        if st == _S_FOOTER:
            return self._footer()
        if st == _S_HEADER:
            return self._header()
        if st == _S_DEVICES:
            return self._devices()
        if st == _S_AFTER_EOF:
            return self._after_eof()
        if st == _S_COLO:
            return self._colo()
        if st == _S_COLO_VMSTATE:
            return self._colo_vmstate()
        return self._done()

    def _header(self) -> Event | _NeedData | None:
        if not self._need(8):
            return NEED_DATA
        magic = self._in.be(0, 4)
        if magic != QEMU_VM_FILE_MAGIC:
            raise self._error(
                f"not a QEMU migration stream: expected magic 0x{QEMU_VM_FILE_MAGIC:08x} "
                f"('QEVM'), got 0x{magic:08x}"
            )
        version = self._in.be(4, 4)
        if version != QEMU_VM_FILE_VERSION:
            raise self._error(
                f"unsupported stream version: expected {QEMU_VM_FILE_VERSION}, got {version}", 4
            )
        self._in.skip(8)
        self._state = _S_TOP
        return Header(version)

    def _top(self) -> Event | _NeedData | None:
        inp = self._in
        if not inp.ensure(1):
            if inp.ended:
                if self._in_checkpoint:
                    raise self._error("truncated COLO checkpoint: input ended before EOF")
                raise self._error("truncated stream: input ended before the EOF section")
            return NEED_DATA
        t = inp.byte()
        if t == SectionType.START or t == SectionType.FULL:
            if t == SectionType.FULL:
                if self._in_checkpoint:
                    raise self._error(
                        "device section inside a COLO checkpoint's RAM part: expected "
                        "SECTION_END or EOF"
                    )
                self._state = _S_DEVICES
                self._dev_offset = inp.offset
                return None
            return self._section_start()
        if t == SectionType.PART or t == SectionType.END:
            if not self._need(5):
                return NEED_DATA
            sid = inp.be(1, 4)
            name = self._sections.get(sid)
            if name is None:
                raise self._error(f"SECTION_{'PART' if t == 2 else 'END'} for unknown "
                                  f"section id {sid}: no SECTION_START announced it", 1)
            inp.skip(5)
            self._enter_ram(sid, name, start=False)
            return SectionPart(sid, name) if t == SectionType.PART else SectionEnd(sid, name)
        if t == SectionType.EOF:
            inp.skip(1)
            self._section_name = None
            if self._in_checkpoint:
                self._in_checkpoint = False
                self._state = _S_COLO
            else:
                self._state = _S_AFTER_EOF
            return Eof()
        if t == SectionType.COMMAND:
            return self._command()
        if t == SectionType.CONFIGURATION:
            return self._configuration()
        if t == SectionType.VMDESCRIPTION:
            raise self._error("VMDESCRIPTION before EOF")
        raise self._error(f"unknown section type 0x{t:02x}")

    def _section_start(self) -> Event | _NeedData | None:
        inp = self._in
        if not self._need(6):
            return NEED_DATA
        sid = inp.be(1, 4)
        n = inp.byte(5)
        if not self._need(6 + n + 8):
            return NEED_DATA
        idstr = self._ascii(inp.bytes_at(6, n), 6)
        instance = inp.be(6 + n, 4)
        version = inp.be(10 + n, 4)
        if idstr != "ram":
            raise self._error(
                f"unsupported iterable section {idstr!r}: qmpshadow handles 'ram' only "
                "(migrate without block migration or dirty-bitmap capabilities)",
                cls=StreamUnsupportedError,
            )
        if sid in self._sections:
            raise self._error(f"section id {sid} started twice", 1)
        inp.skip(14 + n)
        self._sections[sid] = idstr
        self._enter_ram(sid, idstr, start=True)
        return SectionStart(sid, idstr, instance, version)

    def _enter_ram(self, sid: int, name: str, *, start: bool) -> None:
        self._section_id = sid
        self._section_name = name
        self._section_is_start = start
        self._state = _S_RAM

    def _ascii(self, raw: bytes, k: int) -> str:
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise self._error(f"expected an ASCII name, got {raw!r}", k) from None
        if not text.isprintable():
            raise self._error(f"expected a printable name, got {raw!r}", k)
        return text

    def _footer(self) -> Event | _NeedData | None:
        inp = self._in
        if not inp.ensure(1):
            if inp.ended:
                raise self._error("truncated stream: input ended after a section")
            return NEED_DATA
        if inp.byte() != SectionType.FOOTER:
            self._state = _S_TOP
            return None
        if not self._need(5):
            return NEED_DATA
        sid = inp.be(1, 4)
        if sid != self._section_id:
            raise self._error(
                f"section footer for id {sid}, expected id {self._section_id}", 1
            )
        inp.skip(5)
        self._state = _S_TOP
        return SectionFooter(sid)

    def _command(self) -> Event | _NeedData | None:
        inp = self._in
        if not self._need(5):
            return NEED_DATA
        cmd = inp.be(1, 2)
        n = inp.be(3, 2)
        if not self._need(5 + n):
            return NEED_DATA
        data = inp.bytes_at(5, n)
        if cmd == Command.PACKAGED:
            raise self._error(
                "postcopy PACKAGED command: postcopy streams are not supported",
                cls=StreamUnsupportedError,
            )
        if cmd == Command.ENABLE_COLO:
            self.colo_enabled = True
        elif cmd == Command.POSTCOPY_ADVISE:
            self.postcopy_advised = True
        elif not (Command.OPEN_RETURN_PATH <= cmd <= Command.RECV_BITMAP):
            raise self._error(f"unknown command {cmd} in a COMMAND section", 1)
        inp.skip(5 + n)
        return CommandSection(cmd, data)

    def _configuration(self) -> Event | _NeedData | None:
        inp = self._in
        lim = self.limits
        if not self._need(5):
            return NEED_DATA
        n = inp.be(1, 4)
        if n > lim.max_machine_type:
            raise self._error(
                f"machine type length {n} exceeds the bound {lim.max_machine_type}", 1
            )
        k = 5 + n
        if not self._need(k):
            return NEED_DATA
        machine = self._ascii(inp.bytes_at(5, n), 5)
        subs: list[Subsection] = []
        while True:
            if not self._need(k + 1):
                return NEED_DATA
            if inp.byte(k) != SectionType.SUBSECTION:
                break
            if not self._need(k + 2):
                return NEED_DATA
            sn = inp.byte(k + 1)
            if not self._need(k + 2 + sn + 4):
                return NEED_DATA
            name = self._ascii(inp.bytes_at(k + 2, sn), k + 2)
            version = inp.be(k + 2 + sn, 4)
            body = k + 2 + sn + 4
            if name == "configuration/target-page-bits":
                size = 4
            elif name == "configuration/uuid":
                size = 16
            elif name == "configuration/capabilities":
                if not self._need(body + 4):
                    return NEED_DATA
                count = inp.be(body, 4)
                if count > lim.max_capabilities:
                    raise self._error(
                        f"{count} capabilities exceed the bound {lim.max_capabilities}", body
                    )
                size = 4
                for _ in range(count):
                    if not self._need(body + size + 1):
                        return NEED_DATA
                    size += 1 + inp.byte(body + size)
            else:
                raise self._error(
                    f"unknown configuration subsection {name!r}", k,
                    cls=StreamUnsupportedError,
                )
            if not self._need(body + size):
                return NEED_DATA
            subs.append(Subsection(name, version, inp.bytes_at(body, size)))
            k = body + size
        inp.skip(k)
        cfg = Configuration(machine, tuple(subs))
        bits = cfg.target_page_bits
        if bits is not None:
            if not 12 <= bits <= 16:
                raise self._error(f"target page bits {bits} outside 12..16")
            self.page_size = 1 << bits
        try:
            caps = cfg.capabilities
        except (IndexError, UnicodeDecodeError):
            raise self._error("malformed configuration/capabilities") from None
        self.ignore_shared = "x-ignore-shared" in caps
        self.configuration = cfg
        return cfg

    # -- RAM ----------------------------------------------------------------------------
    def _ram(self) -> Event | _NeedData | None:
        inp = self._in
        buf, pos, end = inp.view()
        if end - pos >= 8:
            new_pos, block, records, _status = self._scan(
                buf, pos, end, self.page_size, self._cur_block, self.blocks,
                self.limits.max_records_per_event,
            )
            if records:
                inp.pos = new_pos
                self._cur_block = block
                return RamRecords(self._section_id, buf, records, self.page_size)
        return self._ram_slow()

    def _ram_slow(self) -> Event | _NeedData | None:
        """One record the fast path did not take: straddling, special or invalid."""
        inp = self._in
        if not self._need(8):
            return NEED_DATA
        hdr = inp.be(0, 8)
        mask = self.page_size - 1
        flags = hdr & mask
        offset = hdr - flags
        kind = flags & ~RamFlag.CONTINUE
        if flags & ~_KNOWN_FLAGS or kind & (kind - 1) or kind == 0:
            raise self._error(f"unknown RAM record flags 0x{flags:x} (header 0x{hdr:016x})")
        if kind == RamFlag.EOS:
            if hdr != RamFlag.EOS:
                raise self._error(f"EOS record with extra bits: header 0x{hdr:016x}")
            inp.skip(8)
            self._state = _S_FOOTER
            return RamEos(self._section_id)
        if kind == RamFlag.MEM_SIZE:
            return self._mem_size(offset, flags)
        if kind == RamFlag.HOOK:
            raise self._error("RAM hook record (RDMA migration) is not supported",
                              cls=StreamUnsupportedError)
        if kind == RamFlag.COMPRESS_PAGE:
            raise self._error(
                "compressed page: streams of the 'compress' capability are not supported; "
                "migrate without it", cls=StreamUnsupportedError)
        # ZERO, PAGE, XBZRLE: resolve the block
        k = 8
        if flags & RamFlag.CONTINUE:
            block = self._cur_block
            if block is None:
                raise self._error("RAM record continues a block, but no block was named yet")
        else:
            if not self._need(9):
                return NEED_DATA
            n = inp.byte(8)
            if not self._need(9 + n):
                return NEED_DATA
            raw = inp.bytes_at(9, n)
            found = self.blocks.get(raw)
            if found is None:
                known = ", ".join(repr(b.idstr) for b in self.block_order) or "none"
                raise self._error(
                    f"RAM record names unknown block {raw!r}; blocks announced: {known}", 9
                )
            block = found
            k = 9 + n
        if offset + self.page_size > block[1]:
            raise self._error(
                f"RAM record offset 0x{offset:x} is past block {block[0]!r} of "
                f"length 0x{block[1]:x}"
            )
        if kind == RamFlag.XBZRLE:
            if not self._need(k + 3):
                return NEED_DATA
            enc_flag = inp.byte(k)
            n = inp.be(k + 1, 2)
            if enc_flag != XBZRLE_ENCODING_FLAG:
                raise self._error(f"XBZRLE encoding flag {enc_flag}, expected 1", k)
            if n > self.page_size:
                raise self._error(f"XBZRLE length {n} exceeds the page size", k + 1)
            if not self._need(k + 3 + n):
                return NEED_DATA
            encoded = inp.bytes_at(k + 3, n)
            try:
                xbzrle_runs(encoded, self.page_size)
            except ValueError as exc:
                raise self._error(f"malformed XBZRLE page: {exc}", k + 3) from None
            inp.skip(k + 3 + n)
            self._cur_block = block
            return RamXbzrle(self._section_id, flags, block[0], offset, encoded)
        plen = self.page_size if kind == RamFlag.PAGE else 1
        if not self._need(k + plen):
            return NEED_DATA
        buf, pos = inp.buf, inp.pos
        inp.skip(k + plen)
        self._cur_block = block
        return RamRecords(self._section_id, buf, [(flags, offset, block[0], pos + k)],
                          self.page_size)

    def _mem_size(self, total: int, flags: int) -> Event | _NeedData | None:
        inp = self._in
        if flags != RamFlag.MEM_SIZE or not self._section_is_start:
            raise self._error("MEM_SIZE record outside a RAM SECTION_START")
        extra = 8 if self.ignore_shared else 0
        k = 8
        remaining = total
        decls: list[RamBlockDecl] = []
        while remaining:
            if len(decls) >= self.limits.max_ram_blocks:
                raise self._error(f"more than {self.limits.max_ram_blocks} RAM blocks", k)
            if not self._need(k + 1):
                return NEED_DATA
            n = inp.byte(k)
            if not self._need(k + 1 + n + 8 + extra):
                return NEED_DATA
            name = self._ascii(inp.bytes_at(k + 1, n), k + 1)
            length = inp.be(k + 1 + n, 8)
            if length > remaining or length % self.page_size:
                raise self._error(
                    f"RAM block {name!r} length {length} does not fit the announced total "
                    f"({remaining} left) or is not page aligned", k + 1 + n)
            gpa = inp.be(k + 9 + n, 8) if extra else None
            decls.append(RamBlockDecl(name, length, gpa))
            remaining -= length
            k += 9 + n + extra
        inp.skip(k)
        self.blocks = {d.idstr.encode("ascii"): (d.idstr, d.used_length) for d in decls}
        self.block_order = decls
        self._cur_block = None
        return RamMemSize(total, tuple(decls))

    # -- device sections ------------------------------------------------------------------
    def _devices(self) -> Event | _NeedData | None:
        inp = self._in
        lim = self.limits
        if inp.available():
            self._dev += inp.take_all()
        if len(self._dev) > lim.max_device_state + lim.max_vmdesc + 5:
            raise StreamFormatError(
                f"device sections exceed the bound of {lim.max_device_state} bytes without "
                "a VMDESCRIPTION", offset=self._dev_offset, section="devices")
        found = self._find_vmdesc()
        if found is not None:
            eof_pos, json_end = found
            tail = bytes(self._dev[json_end:])
            self._queue_devices(bytes(self._dev[:eof_pos]), self._dev_offset)
            self._pending.append(Eof())
            self._pending.append(VmDescription(bytes(self._dev[eof_pos + 6 : json_end])))
            consumed_to = self._dev_offset + json_end
            self._dev = bytearray()
            self._reset_input(consumed_to, tail)
            self._state = _S_COLO if self.colo_enabled else _S_DONE
            return None
        if inp.ended:
            if not self._dev or self._dev[-1] != SectionType.EOF:
                raise StreamFormatError(
                    "truncated stream: device sections end without an EOF byte",
                    offset=self._dev_offset + len(self._dev), section="devices")
            self._queue_devices(bytes(self._dev[:-1]), self._dev_offset)
            self._pending.append(Eof())
            self._dev = bytearray()
            self._state = _S_DONE
            return None
        return NEED_DATA

    def _reset_input(self, offset: int, tail: bytes) -> None:
        """Restart the input at ``offset`` holding ``tail`` (bytes after the vmdesc)."""
        ended = self._in.ended
        self._in = Input()
        self._in.base = offset
        if tail:
            self._in.feed(tail)
        if ended:
            self._in.feed(b"")

    def _find_vmdesc(self) -> tuple[int, int] | None:
        """Locate ``EOF, VMDESCRIPTION, be32 len, {json}`` in the held device bytes.

        Returns (position of the EOF byte, end of the JSON) for the first candidate whose
        length fits, whose JSON parses with a "devices" list and whose device list matches
        the footer split of the bytes before it; None while undecided.
        """
        dev = self._dev
        pat = b"\x00\x06"
        i = dev.find(pat, self._dev_scan)
        while i >= 0:
            self._dev_scan = i
            if i + 7 > len(dev):
                return None  # the length is not here yet: look again when more arrives
            n = int.from_bytes(dev[i + 2 : i + 6], "big")
            if 2 <= n <= self.limits.max_vmdesc and dev[i + 6] == 0x7B:  # '{'
                end = i + 6 + n
                if end > len(dev):
                    return None  # a plausible candidate still arriving
                if dev[end - 1] == 0x7D and self._vmdesc_fits(i, end):  # '}'
                    return i, end
            i = dev.find(pat, i + 1)
        self._dev_scan = max(self._dev_scan, len(dev) - 1)
        return None

    def _vmdesc_fits(self, eof_pos: int, end: int) -> bool:
        try:
            doc = json.loads(bytes(self._dev[eof_pos + 6 : end]))
        except ValueError:
            return False
        if not isinstance(doc, dict) or not isinstance(doc.get("devices"), list):
            return False
        expected = [(d.get("name"), d.get("instance_id")) for d in doc["devices"]
                    if isinstance(d, dict)]
        return _split_devices(bytes(self._dev[:eof_pos]), expected) is not None

    def _queue_devices(self, region: bytes, base: int) -> None:
        sections = _split_devices(region, None)
        if sections is None:
            raise StreamFormatError(
                "device sections do not split at their footers: the stream is truncated or "
                "corrupt", offset=base, section="devices")
        self._pending.extend(sections)

    # -- after EOF, COLO -----------------------------------------------------------------
    def _after_eof(self) -> Event | _NeedData | None:
        inp = self._in
        if not inp.ensure(1):
            if inp.ended:
                self._state = _S_DONE
                return None
            return NEED_DATA
        if inp.byte() != SectionType.VMDESCRIPTION:
            if self.colo_enabled:
                self._state = _S_COLO
                return None
            raise self._error(f"expected VMDESCRIPTION or the end after EOF, got byte "
                              f"0x{inp.byte():02x}")
        if not self._need(5):
            return NEED_DATA
        n = inp.be(1, 4)
        if n > self.limits.max_vmdesc:
            raise self._error(f"VMDESCRIPTION length {n} exceeds the bound "
                              f"{self.limits.max_vmdesc}", 1)
        if not self._need(5 + n):
            return NEED_DATA
        body = inp.bytes_at(5, n)
        inp.skip(5 + n)
        self._state = _S_COLO if self.colo_enabled else _S_DONE
        return VmDescription(body)

    def _colo(self) -> Event | _NeedData | None:
        inp = self._in
        if not inp.ensure(4):
            if inp.ended:
                if inp.available():
                    raise self._error("truncated COLO message")
                self._state = _S_DONE
                return None
            return NEED_DATA
        value = inp.be(0, 4)
        try:
            msg = ColoMessage(value)
        except ValueError:
            raise self._error(f"unknown COLO message {value}") from None
        if msg not in COLO_FORWARD:
            raise self._error(
                f"COLO message {msg.name} belongs on the return path, not the stream")
        if msg == ColoMessage.VMSTATE_SIZE:
            if not self._need(12):
                return NEED_DATA
            size = inp.be(4, 8)
            if not 1 <= size <= self.limits.max_device_state:
                raise self._error(f"COLO device state size {size} outside 1.."
                                  f"{self.limits.max_device_state}", 4)
            inp.skip(12)
            self._colo_size = size
            self._state = _S_COLO_VMSTATE
            return ColoMessageEvent(msg, size)
        inp.skip(4)
        if msg == ColoMessage.VMSTATE_SEND:
            self._in_checkpoint = True
            self._state = _S_TOP
        return ColoMessageEvent(msg)

    def _colo_vmstate(self) -> Event | _NeedData | None:
        inp = self._in
        n = self._colo_size
        if not self._need(n):
            return NEED_DATA
        region = inp.bytes_at(0, n)
        if region[-1] != SectionType.EOF:
            raise self._error("COLO device state does not end with EOF", n - 1)
        inp.skip(n)
        self._state = _S_COLO
        self.checkpoints += 1
        body = region[:-1]
        # checkpoints of one VM repeat their section layout: try the last one first (a
        # few byte compares) before the backtracking search (~5 us per section)
        sections = _split_like(body, self._colo_layout)
        if sections is None:
            sections = _split_devices(body, None)
            if sections is None:
                raise StreamFormatError(
                    "COLO device state does not split into sections at their footers",
                    offset=inp.offset - n, section="devices")
            self._colo_layout = _layout_of(body, sections)
        return ColoVmstate(self.checkpoints, tuple(sections), region)

    def _done(self) -> Event | _NeedData | None:
        inp = self._in
        if inp.available():
            raise self._error(f"{inp.available()} bytes after the end of the stream")
        if inp.ended and not self._end_emitted:
            self._end_emitted = True
            return EndOfStream()
        return NEED_DATA


def _parse_full_header(region: bytes, q: int) -> tuple[int, str, int, int, int] | None:
    """(section id, idstr, instance, version, payload start) of a FULL header at q."""
    if q + 6 > len(region) or region[q] != SectionType.FULL:
        return None
    sid = int.from_bytes(region[q + 1 : q + 5], "big")
    n = region[q + 5]
    if n == 0 or q + 14 + n > len(region):
        return None
    raw = region[q + 6 : q + 6 + n]
    if not all(0x20 < b < 0x7F for b in raw):
        return None
    inst = int.from_bytes(region[q + 6 + n : q + 10 + n], "big")
    ver = int.from_bytes(region[q + 10 + n : q + 14 + n], "big")
    return sid, raw.decode("ascii"), inst, ver, q + 14 + n


#: a split of a device region: per section (header start, payload start, footer start,
#: the header's bytes, (section id, idstr, instance, version))
_Layout = tuple[tuple[int, int, int, bytes, tuple[int, str, int, int]], ...]


def _layout_of(region: bytes, sections: list[DeviceSection]) -> _Layout:
    """The layout of ``sections``, a split of ``region`` by :func:`_split_devices`."""
    out = []
    q = 0
    for sec in sections:
        hdr = _parse_full_header(region, q)
        assert hdr is not None, "sections come from _split_devices(region)"
        body = hdr[4]
        r = body + len(sec.payload)
        out.append((q, body, r, region[q:body],
                    (sec.section_id, sec.idstr, sec.instance_id, sec.version_id)))
        q = r + 5
    return tuple(out)


def _split_like(region: bytes, layout: _Layout) -> list[DeviceSection] | None:
    """``region`` split at the positions of ``layout`` if its headers and footers are
    all there (the same headers byte for byte), else None."""
    if not layout or layout[-1][2] + 5 != len(region):
        return None
    out = []
    for q, body, r, header, (sid, name, inst, ver) in layout:
        if (region[q:body] != header or region[r] != 0x7E
                or region[r + 1 : r + 5] != header[1:5]):
            return None
        out.append(DeviceSection(sid, name, inst, ver, region[body:r]))
    return out


def _split_devices(
    region: bytes, expected: list[tuple[object, object]] | None, max_steps: int = 100_000
) -> list[DeviceSection] | None:
    """Split consecutive SECTION_FULL sections (with footers) filling ``region`` exactly.

    Payloads are opaque, so a section ends at a footer ``0x7e be32(id)`` followed by the
    next FULL header or the region's end; a wrong guess is undone by backtracking. With
    ``expected`` ((name, instance) per section, from the vmdesc) headers must match it.
    Returns None when no split exists.
    """
    if not region:
        return [] if not expected else None
    out: list[DeviceSection] = []
    # stack of (header position, next footer search position)
    stack: list[tuple[int, int]] = [(0, -1)]
    steps = 0
    while stack:
        steps += 1
        if steps > max_steps:
            return None
        q, search = stack[-1]
        hdr = _parse_full_header(region, q)
        idx = len(stack) - 1
        if hdr is None or (
            expected is not None
            and (idx >= len(expected) or expected[idx] != (hdr[1], hdr[2]))
        ):
            stack.pop()
            if out:
                out.pop()
            continue
        sid, name, inst, ver, body = hdr
        footer = b"\x7e" + sid.to_bytes(4, "big")
        r = region.find(footer, max(body, search + 1))
        advanced = False
        while r >= 0:
            nxt = r + 5
            if nxt == len(region):
                if expected is None or idx + 1 == len(expected):
                    out.append(DeviceSection(sid, name, inst, ver, region[body:r]))
                    return out
            elif region[nxt] == SectionType.FULL and _parse_full_header(region, nxt):
                stack[-1] = (q, r)
                out.append(DeviceSection(sid, name, inst, ver, region[body:r]))
                stack.append((nxt, -1))
                advanced = True
                break
            r = region.find(footer, r + 1)
        if not advanced:
            stack.pop()
            if out:
                out.pop()
    return None
