"""decode_image, checked against tf.io.decode_image: PNG to the bit, JPEG to the bit through
simplejpeg and within the decoders' tolerance through Pillow."""

from __future__ import annotations

import io
import sys
from typing import Any

import numpy as np
import pytest

import feedline as fl
from feedline.io import images

Image = pytest.importorskip("PIL.Image")

pytestmark = pytest.mark.timeout(120)

RNG = np.random.default_rng(0)
NOISE = RNG.integers(0, 256, (37, 53, 4), dtype=np.uint8)
# JPEG is lossy: a smooth picture, as photographs are, keeps the comparison meaningful.
SMOOTH = np.clip(np.cumsum(RNG.integers(-20, 21, (37, 53, 3)), axis=1) + 128, 0, 255).astype(
    np.uint8
)


def encode(image: Any, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def pngs() -> dict[str, bytes]:
    palette = Image.fromarray(NOISE[..., :3]).quantize(256)
    return {
        "rgb": encode(Image.fromarray(NOISE[..., :3], "RGB"), "PNG"),
        "rgba": encode(Image.fromarray(NOISE, "RGBA"), "PNG"),
        "gray": encode(Image.fromarray(NOISE[..., 0], "L"), "PNG"),
        "gray-alpha": encode(Image.fromarray(NOISE[..., :2], "LA"), "PNG"),
        "palette": encode(palette, "PNG"),
        "palette-transparent": encode(palette, "PNG", transparency=3),
        "16-bit-gray": encode(Image.fromarray(NOISE[..., 0].astype(np.uint16) * 257 + 3), "PNG"),
    }


def jpegs() -> dict[str, bytes]:
    return {
        "rgb-444": encode(Image.fromarray(SMOOTH), "JPEG", quality=90, subsampling=0),
        "rgb-420": encode(Image.fromarray(SMOOTH), "JPEG", quality=75, subsampling=2),
        "gray": encode(Image.fromarray(SMOOTH[..., 0]), "JPEG", quality=90),
    }


@pytest.fixture(scope="module")
def tf() -> Any:
    return pytest.importorskip("tensorflow")


@pytest.fixture(params=["simplejpeg", "pillow"])
def decoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "simplejpeg":
        pytest.importorskip("simplejpeg")
    else:
        monkeypatch.setattr(images, "_simplejpeg", lambda: None)
    return str(request.param)


@pytest.mark.parametrize("channels", [0, 1, 3, 4])
@pytest.mark.parametrize("kind", list(pngs()))
def test_png_equals_tensorflow_to_the_bit(tf: Any, decoder: str, kind: str, channels: int) -> None:
    data = pngs()[kind]
    want = tf.io.decode_image(data, channels=channels).numpy()
    got = fl.io.decode_image(data, channels)
    assert got.dtype == np.uint8 and got.shape == want.shape and got.flags.writeable
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("channels", [0, 1, 3])
@pytest.mark.parametrize("kind", list(jpegs()))
def test_jpeg_equals_tensorflow(tf: Any, decoder: str, kind: str, channels: int) -> None:
    data = jpegs()[kind]
    want = tf.io.decode_image(data, channels=channels).numpy().astype(int)
    got = fl.io.decode_image(data, channels)
    assert got.dtype == np.uint8 and got.shape == want.shape and got.flags.writeable
    diff = np.abs(got.astype(int) - want)
    if decoder == "simplejpeg":
        assert diff.max() == 0  # libjpeg-turbo with TensorFlow's settings: the same pixels
    else:
        # Pillow's libjpeg uses the accurate DCT, TensorFlow the fast one.
        assert diff.max() <= 8 and diff.mean() < 1.5, (diff.max(), diff.mean())


def test_a_jpeg_with_four_channels_is_opaque_rgba(decoder: str) -> None:
    data = jpegs()["rgb-444"]
    rgba = fl.io.decode_image(data, 4)
    np.testing.assert_array_equal(rgba[..., :3], fl.io.decode_image(data, 3))
    assert (rgba[..., 3] == 255).all()


def test_a_small_palette_gets_an_opaque_alpha() -> None:
    # TensorFlow fills alpha with (1 << bit depth) - 1 here: 15 for a 16-colour palette.
    data = encode(Image.fromarray(NOISE[..., :3]).quantize(16), "PNG")
    rgba = fl.io.decode_image(data, 4)
    assert (rgba[..., 3] == 255).all()
    np.testing.assert_array_equal(rgba[..., :3], fl.io.decode_image(data, 3))


def test_other_formats_through_pillow() -> None:
    bmp = encode(Image.fromarray(NOISE[..., :3]), "BMP")
    np.testing.assert_array_equal(fl.io.decode_image(bmp), NOISE[..., :3])
    frames = [Image.fromarray(NOISE[..., :3]).quantize(8), Image.fromarray(SMOOTH).quantize(8)]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    first = np.asarray(frames[0].convert("RGB"))
    np.testing.assert_array_equal(fl.io.decode_image(gif), first)


def corrupt() -> dict[str, bytes]:
    png, jpeg = pngs()["rgb"], jpegs()["rgb-444"]
    flipped = bytearray(png)
    flipped[len(png) // 2] ^= 0xFF
    return {
        "empty": b"",
        "not-an-image": b"hello, world",
        "png-cut-in-half": png[: len(png) // 2],
        "png-without-its-end": png[:-12],
        "png-flipped-byte": bytes(flipped),
        "jpeg-cut-in-half": jpeg[: len(jpeg) // 2],
        "jpeg-header-only": jpeg[:20],
    }


@pytest.mark.parametrize("kind", list(corrupt()))
def test_a_damaged_image_is_a_value_error(decoder: str, kind: str) -> None:
    with pytest.raises(ValueError, match="cannot decode image"):
        fl.io.decode_image(corrupt()[kind])


def test_in_a_pipeline_a_damaged_image_fails_its_element() -> None:
    good = pngs()["rgb"]
    ds = fl.Dataset.from_tensor_slices(np.array([good, b"junk", good], dtype=object))
    decoded = ds.map(fl.io.decode_image).ignore_errors()
    assert [x.shape for x in decoded.as_numpy_iterator()] == [(37, 53, 3)] * 2
    with pytest.raises(fl.StageError, match="cannot decode image"):
        list(ds.map(fl.io.decode_image))


def test_bad_channels_and_other_byte_types() -> None:
    data = pngs()["gray"]
    for bad in (2, 5, True, -1):
        with pytest.raises(ValueError, match="channels"):
            fl.io.decode_image(data, bad)
    want = fl.io.decode_image(data, 1)
    np.testing.assert_array_equal(fl.io.decode_image(bytearray(data), 1), want)
    np.testing.assert_array_equal(fl.io.decode_image(np.frombuffer(data, np.uint8), 1), want)


def test_without_pillow_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    data = pngs()["rgb"]
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match=r"feedline\[images\]"):
        fl.io.decode_image(data)
