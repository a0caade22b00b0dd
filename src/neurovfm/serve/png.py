"""A minimal PNG writer (8-bit grey or RGBA) so the server needs no imaging library: a slice is
a small array, and zlib plus three chunks is all a PNG is."""

from __future__ import annotations

import struct
import zlib

import numpy as np


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(img: np.ndarray, level: int = 3) -> bytes:
    """``img``: uint8 [h, w] (grey) or [h, w, 4] (RGBA)."""
    a = np.ascontiguousarray(img, np.uint8)
    if a.ndim == 2:
        colour, channels = 0, 1
    elif a.ndim == 3 and a.shape[2] == 4:
        colour, channels = 6, 4
    else:
        raise ValueError(f"encode_png: need [h, w] or [h, w, 4], got {a.shape}")
    h, w = a.shape[:2]
    rows = a.reshape(h, w * channels)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()  # filter 0 on every row
    ihdr = struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw, level)) + _chunk(b"IEND", b"")
