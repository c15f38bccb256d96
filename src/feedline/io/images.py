"""``decode_image``: JPEG, PNG (and what else Pillow reads) to a uint8 ``[H, W, C]`` array.

The counterpart of ``tf.io.decode_image``, with its channel conversions. JPEG goes through
simplejpeg (libjpeg-turbo) when it is installed, with the decoder settings TensorFlow uses
(fast integer DCT, smooth chroma upsampling), so its pixels equal tf.data's; everything else,
and JPEG without simplejpeg, through Pillow. Both are the ``feedline[images]`` extra.
"""

from __future__ import annotations

import functools
import io
from types import ModuleType
from typing import Any

import numpy as np

from feedline.io import fs

_JPEG = b"\xff\xd8\xff"
_PNG = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"  # the last chunk's type and CRC
# libpng's integer RGB -> gray weights: TensorFlow asks it for 0.299 red and 0.587 green,
# which libpng truncates to 1/32768ths (blue gets the rest), and it truncates each sum too.
# Computed the same way, a PNG's gray equals TensorFlow's to the bit.
_GRAY_WEIGHTS = np.array([9797, 19234, 3737], dtype=np.uint32)


def _pillow() -> ModuleType:
    fs.require("PIL", "images", "decode_image")
    from PIL import Image

    return Image


@functools.cache
def _simplejpeg() -> ModuleType | None:
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def decode_image(data: Any, channels: int = 3) -> np.ndarray:
    """An image file's bytes as a uint8 array ``[height, width, channels]``.

    Like ``tf.io.decode_image(data, channels, expand_animations=False)``: ``channels`` 1
    (gray), 3 (RGB) or 4 (RGBA), or 0 for the file's own. Gray becomes RGB by repetition, an
    alpha channel is dropped for 1 or 3 channels and is opaque (255) where the file has none;
    RGB becomes gray with TensorFlow's weights. (TensorFlow refuses 4 channels for a JPEG;
    here it is RGB with an opaque alpha.) 16-bit PNGs keep their high byte, palettes are
    expanded, a GIF gives its first frame.

    Bytes that are not a whole, valid image raise ``ValueError`` naming what failed, as TF's
    ``InvalidArgumentError`` does: in a ``map`` that is a ``StageError`` for that element,
    which ``ignore_errors()`` skips.
    """
    if isinstance(channels, bool) or channels not in (0, 1, 3, 4):
        raise ValueError(f"channels must be 0, 1, 3 or 4, got {channels!r}")
    raw = data if isinstance(data, bytes) else bytes(memoryview(data))
    decoder = _simplejpeg()
    try:
        if decoder is not None and raw.startswith(_JPEG):
            image = _decode_jpeg(decoder, raw, channels)
        else:
            image = _decode_pillow(raw, channels)
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        # Pillow's errors for damaged files are OSError (truncated, unidentified), SyntaxError
        # (a broken PNG chunk) and EOFError; simplejpeg's are ValueError.
        raise ValueError(
            f"cannot decode image ({len(raw)} bytes starting {raw[:8]!r}): {e}"
        ) from None
    return _to_channels(image, channels)


def _decode_jpeg(decoder: ModuleType, raw: bytes, channels: int) -> np.ndarray:
    gray = channels == 1 or (channels == 0 and decoder.decode_jpeg_header(raw)[2] == "Gray")
    image = decoder.decode_jpeg(
        raw, colorspace="GRAY" if gray else "RGB", fastdct=True, fastupsample=False
    )
    return np.asarray(image)


def _decode_pillow(raw: bytes, channels: int) -> np.ndarray:
    Image = _pillow()
    if raw.startswith(_PNG):
        # Decoding alone checks no chunk's CRC: a flipped byte could become a wrong pixel, and
        # a file cut after its last pixel row would pass. verify() reads every chunk's CRC
        # (without inflating), and the file must end in its IEND chunk.
        with Image.open(io.BytesIO(raw)) as image:
            image.verify()
        if not raw.endswith(_PNG_END):
            raise ValueError("the PNG file is cut short: it does not end with its IEND chunk")
    with Image.open(io.BytesIO(raw)) as image:
        if image.format == "JPEG" and channels == 1:
            image.draft("L", image.size)  # libjpeg's own gray (the Y plane), as TensorFlow's
        image.load()
        return _pixels(image)


def _pixels(image: Any) -> np.ndarray:
    """A Pillow image as uint8 ``[H, W, C]`` with the file's channels (1 to 4)."""
    mode = image.mode
    if mode == "P" or mode == "PA":
        transparent = "transparency" in image.info or mode == "PA"
        image = image.convert("RGBA" if transparent else "RGB")
    elif mode == "1":
        image = image.convert("L")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
    elif mode.startswith("I") or mode == "F":
        # 16-bit gray ("I;16" and the like): its high byte, as libpng's strip_16 keeps.
        wide = np.asarray(image)
        if mode == "F" or wide.max(initial=0) > 0xFFFF:
            raise ValueError(f"{mode} images of more than 16 bits are not decoded")
        return (wide.astype(np.uint32) >> 8).astype(np.uint8)[..., None]
    # np.array, not asarray: Pillow's buffer would give a read-only array, and augmentations
    # write into the pixels they are given.
    pixels = np.array(image)
    if pixels.dtype != np.uint8:
        raise ValueError(f"{image.mode} pixels are {pixels.dtype}, not 8-bit")
    return pixels[..., None] if pixels.ndim == 2 else pixels


def _to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    have = image.shape[-1]
    if channels in (0, have):
        return image
    color = image[..., :3] if have >= 3 else np.repeat(image[..., :1], 3, axis=-1)
    if channels == 1:
        if have <= 2:
            return np.ascontiguousarray(image[..., :1])
        gray = (color.astype(np.uint32) @ _GRAY_WEIGHTS) >> 15
        return gray.astype(np.uint8)[..., None]
    if channels == 3:
        return np.ascontiguousarray(color)
    alpha = image[..., have - 1 :] if have in (2, 4) else np.full_like(image[..., :1], 255)
    return np.concatenate([color, alpha], axis=-1)
