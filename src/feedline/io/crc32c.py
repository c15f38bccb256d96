"""CRC32C (Castagnoli), the checksum of TFRecord files, and TFRecord's masking of it.

``google-crc32c`` (the ``feedline[tfrecord]`` extra: hardware CRC, 29-31 GB/s here on
100 KiB, ~8 GB/s on 1 KiB where the call costs more than the bytes) when installed. It
releases the GIL only for ``bytes`` of 1 MiB or more (``_crc32c.c``): records below are
checked holding it, so threads reading small records do not check them in parallel.
Without it, a numpy path, with a warning once, that computes ~sqrt(n) lanes of the data side
by side and folds them together with the CRC's linearity (no pure-Python CRC32C package beats
it, and the standard library's ``zlib.crc32`` is another polynomial).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable

import numpy as np

from feedline.io.fs import require

MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF
_POLY = 0x82F63B78  # Castagnoli, reflected


def _byte_table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(_POLY), t >> 1).astype(np.uint32)
    return t


_TABLE = _byte_table()
_TABLE_LIST = [int(v) for v in _TABLE]


def _apply(images: np.ndarray, registers: np.ndarray) -> np.ndarray:
    """A linear map of CRC registers (given by the images of the 32 unit vectors) applied to
    an array of registers, a byte of the register at a time."""
    out = np.zeros_like(registers)
    for byte in range(4):
        part = (registers >> np.uint32(8 * byte)) & np.uint32(0xFF)
        out ^= _byte_images(images.tobytes(), byte)[part]
    return out


@functools.lru_cache(maxsize=256)
def _byte_images(images: bytes, byte: int) -> np.ndarray:
    """The map's values on every register that is zero except in ``byte``: 256 of them."""
    unit = np.frombuffer(images, dtype=np.uint32)[8 * byte : 8 * byte + 8]
    values = np.arange(256)
    table = np.zeros(256, dtype=np.uint32)
    for bit in range(8):
        table[(values >> bit) & 1 == 1] ^= unit[bit]
    return table


@functools.lru_cache(maxsize=128)
def _zeros_map(count: int) -> np.ndarray:
    """The images of the unit registers after ``count`` zero bytes (the register's part of a
    CRC is linear: crc(c, data) = crc(c, zeros) ^ crc(0, data))."""
    if count == 1:
        units = np.uint32(1) << np.arange(32, dtype=np.uint32)
        return (units >> np.uint32(8)) ^ _TABLE[units & np.uint32(0xFF)]
    half = _zeros_map(count // 2)
    twice = _apply(half, half)
    return _apply(_zeros_map(1), twice) if count % 2 else twice


def _run_rows(rows: np.ndarray, regs: np.ndarray) -> np.ndarray:
    """The CRC registers ``regs`` after each row of bytes (uint8, one row per register)."""
    block = rows.astype(np.uint32)
    for j in range(block.shape[1]):
        regs = (regs >> np.uint32(8)) ^ _TABLE[(regs ^ block[:, j]) & np.uint32(0xFF)]
    return regs


def mask(crcs: np.ndarray) -> np.ndarray:
    """TFRecord's masking of an array of CRC32Cs (uint32), as ``masked_crc32c`` masks one."""
    return ((crcs >> np.uint32(15)) | (crcs << np.uint32(17))) + np.uint32(MASK_DELTA)


def crc32c_numpy(data: bytes) -> int:
    """CRC32C without ``google-crc32c``: lanes of the data run through the byte table side by
    side (numpy over ~sqrt(n) lanes), then fold into one with the linear zero-byte maps."""
    n = len(data)
    if n < 64:  # a record header: a plain loop is cheaper than setting up lanes
        crc = _U32
        for b in data:
            crc = (crc >> 8) ^ _TABLE_LIST[(crc ^ b) & 0xFF]
        return crc ^ _U32
    lanes = 1 << (math.isqrt(n).bit_length() - 1)
    width = -(-n // lanes)
    # Zero bytes in front change nothing of a CRC started from 0.
    padded = np.zeros(lanes * width, dtype=np.uint8)
    padded[lanes * width - n :] = np.frombuffer(data, dtype=np.uint8)
    regs = _run_rows(padded.reshape(lanes, width), np.zeros(lanes, dtype=np.uint32))
    span = width
    while len(regs) > 1:  # lanes is a power of two: halves pair up exactly
        regs = _apply(_zeros_map(span), regs[0::2]) ^ regs[1::2]
        span *= 2
    start = int(_apply(_zeros_map(n), np.array([_U32], dtype=np.uint32))[0])
    return int(regs[0]) ^ start ^ _U32


@functools.cache
def crc32c_function() -> Callable[[bytes], int]:
    """``google_crc32c.value`` (hardware CRC), or the numpy path with a warning, once."""
    try:
        module = require("google_crc32c", "tfrecord", "Fast TFRecord checksums")
    except ImportError as error:
        warnings.warn(f"{error}; using a much slower numpy CRC32C", RuntimeWarning, stacklevel=3)
        return crc32c_numpy
    return module.value  # type: ignore[no-any-return]


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: CRC32C rotated and offset, as ``record_writer.cc`` masks it."""
    crc = crc32c_function()(data)
    return (((crc >> 15) | (crc << 17)) + MASK_DELTA) & _U32
