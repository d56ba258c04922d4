"""Resume inflating a gzip stream at any deflate block boundary, with the standard library's zlib.

A checkpoint of an indexed gzip layer (``snapshotter.formats.gzindex``) is a deflate block
boundary: a bit position in the blob and the 32 KiB of uncompressed data before it (the window
that back-references may reach into). zlib resumes there with ``inflatePrime`` (feed the first
partial byte's bits) and ``inflateSetDictionary`` (the window); Python's ``zlib`` offers the
dictionary (``zdict`` of a raw ``decompressobj``) but not ``inflatePrime``.

So a stream starting at bit ``b`` of its first byte is given a *primer*: deflate blocks that
produce no output (empty fixed-Huffman blocks of 10 bits, one empty dynamic-Huffman block of 105
bits for odd ``b``) whose bits end exactly where the real block begins. The primer's last ``b``
bits take the place of the first byte's low ``b`` bits (which belong to the block before the
checkpoint), its whole bytes go in front. The byte alignment of everything after is unchanged, as
stored blocks need (shifting the stream by ``b`` bits instead would break them), and nothing
enters the window before the real data, so the dictionary stays exact. Tested against zlib for
every bit position and against every checkpoint of real layers.

Pure functions on bytes; the output is bounded by the caller's ``want``.
"""

from __future__ import annotations

import zlib

from snapshotter.formats.index import FormatError

WINDOW_SIZE = 32 << 10  # deflate's largest back-reference distance
_GZIP_TRAILER = 8  # CRC-32 and ISIZE after a member's last block

# The code-length alphabet's transmission order (RFC 1951, 3.2.7).
_CODE_LENGTH_ORDER = (16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15)


class _Bits:
    """A little-endian bit string as deflate packs it: fields LSB first, Huffman codes MSB first."""

    def __init__(self) -> None:
        self.value = 0
        self.count = 0

    def field(self, value: int, width: int) -> None:
        self.value |= (value & ((1 << width) - 1)) << self.count
        self.count += width

    def code(self, code: int, length: int) -> None:
        reversed_code = int(format(code, f"0{length}b")[::-1], 2)
        self.field(reversed_code, length)


def _empty_fixed_block(bits: _Bits) -> None:
    """A non-final fixed-Huffman block holding only its end-of-block code: 10 bits."""
    bits.field(0, 1)  # BFINAL
    bits.field(1, 2)  # BTYPE 01: fixed Huffman codes
    bits.code(0, 7)  # symbol 256 (end of block) is 0000000


def _empty_dynamic_block(bits: _Bits) -> None:
    """A non-final dynamic-Huffman block holding only its end-of-block code: 105 bits (odd, which
    the 10-bit fixed blocks cannot make). Its literal/length code has one symbol, 256, of length 1
    (zlib accepts that one incomplete code); its distance code is one unused length-0 entry."""
    bits.field(0, 1)  # BFINAL
    bits.field(2, 2)  # BTYPE 10: dynamic Huffman codes
    bits.field(0, 5)  # HLIT: 257 literal/length codes
    bits.field(0, 5)  # HDIST: 1 distance code
    bits.field(len(_CODE_LENGTH_ORDER) - 4, 4)  # HCLEN: all 19 code-length code lengths
    # The code-length code (complete): 18 -> "0", 0 -> "10", 1 -> "11" (canonical order).
    lengths = {18: 1, 0: 2, 1: 2}
    for symbol in _CODE_LENGTH_ORDER:
        bits.field(lengths.get(symbol, 0), 3)
    repeat_zeros, zero, one = (0b0, 1), (0b10, 2), (0b11, 2)
    bits.code(*repeat_zeros)  # 18: 11 + 127 = 138 zero lengths ...
    bits.field(127, 7)
    bits.code(*repeat_zeros)  # ... and 11 + 107 = 118 more: symbols 0-255 unused
    bits.field(107, 7)
    bits.code(*one)  # symbol 256 has length 1
    bits.code(*zero)  # the one distance code is unused
    bits.code(0, 1)  # end of block


def _primer(bit: int) -> _Bits:
    """Empty blocks whose length in bits is ``bit`` modulo 8."""
    bits = _Bits()
    if bit % 2:
        _empty_dynamic_block(bits)  # 105 bits: 1 modulo 8
    while bits.count % 8 != bit:
        _empty_fixed_block(bits)  # 10 bits: +2 modulo 8
    return bits


def _primer_bytes(bit: int) -> tuple[bytes, int]:
    """The primer's whole bytes, and its last ``bit`` bits (to go into the first data byte)."""
    bits = _primer(bit)
    whole = bits.count // 8
    return (bits.value & ((1 << (8 * whole)) - 1)).to_bytes(whole, "little"), bits.value >> (8 * whole)


_PRIMERS = tuple(_primer_bytes(bit) for bit in range(8))


def primed(data: bytes, bit: int) -> bytes:
    """A raw deflate stream equivalent to ``data`` read from bit ``bit`` (0-7, LSB first) of its
    first byte on: what ``inflatePrime`` would have zlib see."""
    if not 0 <= bit <= 7:
        raise FormatError(f"resume bit {bit} is not in 0..7")
    if bit == 0:
        return data
    if not data:
        raise FormatError("no data to resume from")
    head, tail = _PRIMERS[bit]
    first = (data[0] & (0xFF << bit) & 0xFF) | tail
    return b"".join((head, bytes((first,)), data[1:]))


def inflate_from(data: bytes, bit: int, window: bytes, want: int, *, member_start: bool = False) -> bytes:
    """The first ``want`` bytes (fewer only if the data ends first) that inflating ``data`` from
    bit ``bit`` of its first byte yields, with ``window`` as the uncompressed bytes before it.

    ``member_start``: ``data`` begins with a gzip member header (``bit`` is 0, no window). A stream
    that ends (its final block) before ``want`` bytes goes on with the next gzip member, as a
    multi-member gzip file does. FormatError when the bytes are not valid deflate data.
    """
    if len(window) > WINDOW_SIZE:
        raise FormatError(f"window of {len(window)} bytes is larger than deflate's {WINDOW_SIZE}")
    if member_start and (bit or window):
        raise FormatError("a checkpoint at a gzip member header has no bit offset or window")
    try:
        if member_start:
            inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
            pending = data
        else:
            inflater = (
                zlib.decompressobj(-zlib.MAX_WBITS, zdict=window) if window else zlib.decompressobj(-15)
            )
            pending = primed(data, bit)
        parts: list[bytes] = []
        have = 0
        while have < want:
            out = inflater.decompress(pending, want - have)
            parts.append(out)
            have += len(out)
            pending = inflater.unconsumed_tail
            if have >= want:
                break
            if not inflater.eof:
                if not pending:
                    break  # the data ends before ``want`` bytes
                continue
            # The member ended: skip its trailer (raw streams leave it unread) and go on with the
            # next member's header, if the data holds one.
            rest = inflater.unused_data
            if not member_start:
                rest = rest[_GZIP_TRAILER:]
            if not rest:
                break
            inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
            pending, member_start = rest, True
        return b"".join(parts)
    except zlib.error as exc:
        raise FormatError(f"corrupt deflate data from the checkpoint: {exc}") from None
