# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled twin of qmpshadow/migstream/_ramscan_py.py (which is the specification)."""

from libc.stdint cimport uint64_t
from libc.string cimport memcpy, memset
from cpython.bytes cimport PyBytes_FromStringAndSize

cdef extern from *:
    uint64_t __builtin_bswap64(uint64_t) nogil

NEED_DATA = 0
SPECIAL = 1
LIMIT = 2

cdef enum:
    _ZERO = 0x02
    _PAGE = 0x08
    _CONT = 0x20


cdef inline uint64_t _be64(const unsigned char* p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return __builtin_bswap64(v)


def scan_records(const unsigned char[::1] data, Py_ssize_t pos, Py_ssize_t end,
                 Py_ssize_t page_size, object block, dict blocks, Py_ssize_t max_records):
    cdef list records = []
    cdef Py_ssize_t count = 0, p, plen, n
    cdef uint64_t hdr, flags, kind, offset, mask = <uint64_t>(page_size - 1)
    cdef uint64_t cur_len = 0
    cdef object cur = block, nb
    cdef const unsigned char* buf
    if end > data.shape[0]:
        raise ValueError("end past the buffer")
    if end - pos < 8:
        return pos, block, records, NEED_DATA
    buf = &data[0]
    if cur is not None:
        cur_len = <uint64_t>cur[1]
    while count < max_records:
        if end - pos < 8:
            return pos, block, records, NEED_DATA
        hdr = _be64(buf + pos)
        flags = hdr & mask
        offset = hdr - flags
        kind = flags & ~(<uint64_t>_CONT)
        if kind == _PAGE:
            plen = page_size
        elif kind == _ZERO:
            plen = 1
        else:
            return pos, block, records, SPECIAL
        p = pos + 8
        if not (flags & _CONT):
            if p >= end:
                return pos, block, records, NEED_DATA
            n = buf[p]
            if end - p < 1 + n:
                return pos, block, records, NEED_DATA
            nb = blocks.get(PyBytes_FromStringAndSize(<const char*>buf + p + 1, n))
            if nb is None:
                return pos, block, records, SPECIAL
            p += 1 + n
            if offset + <uint64_t>page_size > <uint64_t>nb[1]:
                return pos, block, records, SPECIAL
            if end - p < plen:
                return pos, block, records, NEED_DATA
            cur = nb
            cur_len = <uint64_t>nb[1]
        else:
            if cur is None or offset + <uint64_t>page_size > cur_len:
                return pos, block, records, SPECIAL
            if end - p < plen:
                return pos, block, records, NEED_DATA
        records.append((<int>flags, offset, cur[0], p))
        count += 1
        pos = p + plen
        block = cur
    return pos, block, records, LIMIT


def apply_records(const unsigned char[::1] data, list records, Py_ssize_t page_size,
                  dict targets):
    cdef Py_ssize_t pages = 0, zeros = 0, pos, tlen = 0
    cdef uint64_t offset
    cdef int flags
    cdef object name, last_name = None, target
    cdef unsigned char[::1] view
    cdef unsigned char* dst = NULL
    cdef const unsigned char* src
    cdef tuple rec
    if data.shape[0] == 0:
        return 0, 0
    src = &data[0]
    for rec in records:
        name = rec[2]
        if name is not last_name:
            last_name = name
            target = targets.get(name)
            if target is None:
                dst = NULL
            else:
                view = target
                tlen = view.shape[0]
                dst = &view[0] if tlen else NULL
        if dst == NULL:
            continue
        flags = rec[0]
        offset = rec[1]
        pos = rec[3]
        if offset + <uint64_t>page_size > <uint64_t>tlen:
            raise ValueError(f"target for block {name!r} is shorter than offset {offset}")
        if pos + (page_size if flags & _PAGE else 1) > data.shape[0]:
            raise ValueError("record payload past the data")
        if flags & _PAGE:
            memcpy(dst + offset, src + pos, page_size)
            pages += 1
        else:
            memset(dst + offset, src[pos], page_size)
            zeros += 1
    return pages, zeros
