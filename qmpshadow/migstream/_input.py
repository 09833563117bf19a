"""Input buffer of the sans-I/O parsers: received chunks, read without copying the bulk.

Chunks are kept as received (immutable bytes). Consumers read contiguous bytes from the
current chunk; only a record that straddles two chunks is copied, into a small "bridge" of
exactly the bytes asked for, after which reading continues in the next chunk in place. So
events can refer into the input (zero copy) and stay valid after later input arrives.
"""

from __future__ import annotations

from collections import deque


class Input:
    """Byte queue with absolute offsets; see the module docstring."""

    __slots__ = ("base", "buf", "chunks", "ended", "pos", "queued")

    def __init__(self) -> None:
        self.buf: bytes | memoryview = b""
        self.pos = 0
        self.base = 0  # absolute stream offset of buf[0]
        self.chunks: deque[bytes | memoryview] = deque()
        self.queued = 0
        self.ended = False

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes; empty ``data`` marks the end of input."""
        if not data:
            self.ended = True
            return
        if self.ended:
            raise RuntimeError("receive_data() after the end of input")
        chunk = data if isinstance(data, bytes) else bytes(data)
        self.chunks.append(chunk)
        self.queued += len(chunk)

    @property
    def offset(self) -> int:
        """Absolute offset of the next unread byte."""
        return self.base + self.pos

    def available(self) -> int:
        """Unread bytes held."""
        return len(self.buf) - self.pos + self.queued

    def _next_chunk(self) -> None:
        self.base += len(self.buf)
        self.buf = self.chunks.popleft()
        self.queued -= len(self.buf)
        self.pos = 0

    def view(self) -> tuple[bytes | memoryview, int, int]:
        """(buffer, start, end) of the unread bytes of the current chunk (maybe empty)."""
        if self.pos == len(self.buf) and self.chunks:
            self._next_chunk()
        return self.buf, self.pos, len(self.buf)

    def ensure(self, n: int) -> bool:
        """Make ``n`` unread bytes contiguous at ``buf[pos:]``; False if fewer are held."""
        have = len(self.buf) - self.pos
        if have >= n:
            return True
        if have + self.queued < n:
            return False
        if have == 0:
            self._next_chunk()
            return self.ensure(n)
        parts = [self.buf[self.pos :]]
        need = n - have
        while need:
            chunk = self.chunks.popleft()
            self.queued -= len(chunk)
            if len(chunk) > need:
                rest = memoryview(chunk)[need:]
                self.chunks.appendleft(rest)
                self.queued += len(rest)
                chunk = chunk[:need]
            parts.append(chunk)
            need -= len(chunk)
        self.base += self.pos
        self.buf = b"".join(parts)
        self.pos = 0
        return True

    def byte(self, k: int = 0) -> int:
        """The unread byte at ``k`` (caller ensured it)."""
        return self.buf[self.pos + k]

    def be(self, k: int, size: int) -> int:
        """Big-endian unsigned integer at ``k`` (caller ensured it)."""
        p = self.pos + k
        return int.from_bytes(self.buf[p : p + size], "big")

    def bytes_at(self, k: int, size: int) -> bytes:
        """Copy of ``size`` bytes at ``k`` (caller ensured it)."""
        p = self.pos + k
        return bytes(self.buf[p : p + size])

    def skip(self, n: int) -> None:
        """Consume ``n`` ensured bytes."""
        self.pos += n

    def take_all(self) -> bytes:
        """Consume and return every unread byte (copy)."""
        parts = [self.buf[self.pos :], *self.chunks]
        self.base += len(self.buf)
        for c in self.chunks:
            self.base += len(c)
        self.buf, self.pos = b"", 0
        self.chunks.clear()
        self.queued = 0
        return b"".join(parts)
