"""Pixels of a PNG (8-bit RGB or RGBA, not interlaced: what Chromium writes), decoded with
zlib and the five row filters of the PNG spec, so screenshots need no imaging library."""

from __future__ import annotations

import struct
import zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"
Pixel = tuple[int, int, int]


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk."""
    if data[:8] != SIGNATURE or data[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    width, height = struct.unpack("!II", data[16:24])
    return width, height


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def _unfilter(kind: int, row: bytearray, prior: bytearray, bpp: int) -> None:
    if kind == 1:  # Sub
        for i in range(bpp, len(row)):
            row[i] = (row[i] + row[i - bpp]) & 0xFF
    elif kind == 2:  # Up
        row[:] = bytes((x + y) & 0xFF for x, y in zip(row, prior, strict=True))
    elif kind == 3:  # Average
        for i in range(len(row)):
            left = row[i - bpp] if i >= bpp else 0
            row[i] = (row[i] + ((left + prior[i]) >> 1)) & 0xFF
    elif kind == 4:  # Paeth
        for i in range(len(row)):
            left, upper_left = (row[i - bpp], prior[i - bpp]) if i >= bpp else (0, 0)
            row[i] = (row[i] + _paeth(left, prior[i], upper_left)) & 0xFF
    elif kind != 0:
        raise ValueError(f"PNG filter type {kind}")


def png_rows(data: bytes, rows: int | None = None) -> list[list[Pixel]]:
    """The RGB pixels of the first `rows` rows (all by default), top to bottom."""
    width, height = png_size(data)
    bit_depth, color_type, interlace = data[24], data[25], data[28]
    if bit_depth != 8 or color_type not in (2, 6) or interlace:
        raise ValueError(f"unsupported PNG: depth {bit_depth}, color type {color_type}")
    bpp = 3 if color_type == 2 else 4
    idat, offset = bytearray(), 8
    while offset < len(data):
        (length,) = struct.unpack("!I", data[offset : offset + 4])
        if data[offset + 4 : offset + 8] == b"IDAT":
            idat += data[offset + 8 : offset + 8 + length]
        offset += 12 + length
    raw = zlib.decompress(bytes(idat))
    stride = width * bpp + 1
    prior = bytearray(width * bpp)
    pixels = []
    for y in range(height if rows is None else min(rows, height)):
        row = bytearray(raw[y * stride + 1 : (y + 1) * stride])
        _unfilter(raw[y * stride], row, prior, bpp)
        pixels.append([(row[x], row[x + 1], row[x + 2]) for x in range(0, len(row), bpp)])
        prior = row
    return pixels
