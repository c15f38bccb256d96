"""The workloads of shared/BENCHMARKS.md: their data and the per-element work every system runs.

Every system maps the same element function over the element indices ``0 .. n-1``: the function
is the whole per-element work (including reading the element's data), so a system differs only
in how it schedules calls, batches and buffers. Element functions are small picklable classes
that load their data lazily, once per process, because Grain's process prefetch (spawn) and
torch's workers call them in other processes.

Randomness (the image crop and flip) is drawn from ``(SEED, element index)``, never from a
worker's state, so every system and every parallelism produces the same elements.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SEED = 20_240_601
# Bump when generated data changes, so a stale cache in the data directory is rebuilt.
DATA_VERSION = "2"

ElementFn = Callable[[Any], Any]

# ---------------------------------------------------------------------------------------------
# overhead: x + 1 on a Python int


def add_one(x: Any) -> Any:
    return x + 1


# ---------------------------------------------------------------------------------------------
# numpy_cpu: numpy work that releases the GIL

IMAGE_SHAPE = (224, 224, 3)
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# Rounds of (to float32, normalise, flip): sets the per-element cost to ~1-3 ms on a 2020s core.
NUMPY_ROUNDS = 2


def numpy_source_image(i: int) -> np.ndarray:
    """Element ``i`` of the numpy_cpu source: a uint8 image drawn from ``default_rng(i)``."""
    return np.random.default_rng(int(i)).integers(0, 256, IMAGE_SHAPE, dtype=np.uint8)


class NumpyAugment:
    """numpy_cpu's work: each round is a float32 conversion, a normalisation and a flip."""

    def __call__(self, i: Any) -> np.ndarray:
        image = numpy_source_image(int(i))
        out = image
        for _ in range(NUMPY_ROUNDS):
            x = image.astype(np.float32)
            x *= np.float32(1 / 255)
            x -= MEAN
            x /= STD
            out = np.ascontiguousarray(x[:, ::-1])
        return out


# ---------------------------------------------------------------------------------------------
# python_cpu: a pure-Python tokenizer that holds the GIL

SEQ_LEN = 256
VOCAB_SIZE = 20_000  # ids 1..VOCAB_SIZE are known words; 0 pads
OOV_BUCKETS = 5_000  # unknown words hash to VOCAB_SIZE + 1 + bucket
TEXT_LINES = 20_000
WORDS_PER_LINE = 300
_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"


def _fnv1a(word: str) -> int:
    """A stable string hash in pure Python: ``hash()`` is salted per process, so worker
    processes would disagree on ids; and the GIL-bound cost is the point of this workload."""
    h = 0x811C9DC5
    for ch in word:
        h = ((h ^ ord(ch)) * 0x01000193) & 0xFFFFFFFF
    return h


def tokenize(line: str, vocab: dict[str, int]) -> np.ndarray:
    """lower, split, keep letters and digits, look each word up; an unknown word hashes to a
    bucket; pad or trim to SEQ_LEN. Written as plain Python on purpose: it holds the GIL."""
    ids: list[int] = []
    for raw in line.lower().split():
        word = "".join(ch for ch in raw if ch.isalnum())
        token = vocab.get(word)
        if token is None:
            token = VOCAB_SIZE + 1 + _fnv1a(word) % OOV_BUCKETS
        ids.append(token)
    ids = ids[:SEQ_LEN]
    ids.extend([0] * (SEQ_LEN - len(ids)))
    return np.array(ids, dtype=np.int32)


def _make_words(rng: np.random.Generator, count: int, syllables: tuple[int, int]) -> list[str]:
    consonants = rng.integers(0, len(_CONSONANTS), (count, syllables[1]))
    vowels = rng.integers(0, len(_VOWELS), (count, syllables[1]))
    lengths = rng.integers(syllables[0], syllables[1] + 1, count)
    return [
        "".join(_CONSONANTS[c] + _VOWELS[v] for c, v in zip(cs[:n], vs[:n], strict=True))
        for cs, vs, n in zip(consonants, vowels, lengths, strict=True)
    ]


def _write_text(directory: Path) -> None:
    """Lines of ~300 words: 60% from a known vocabulary, 40% unknown; capitals, punctuation."""
    rng = np.random.default_rng(SEED)
    known = list(dict.fromkeys(_make_words(rng, VOCAB_SIZE * 2, (1, 4))))[:VOCAB_SIZE]
    known_set = set(known)
    unknown = [w for w in _make_words(rng, 60_000, (3, 7)) if w not in known_set]
    # Zipf-like word frequencies, as in real text: a few words are very common.
    weights = 1.0 / np.arange(1, len(known) + 1)
    weights /= weights.sum()
    lines = []
    for _ in range(TEXT_LINES):
        n = int(rng.integers(WORDS_PER_LINE - 30, WORDS_PER_LINE + 31))
        is_known = rng.random(n) < 0.6
        known_idx = rng.choice(len(known), n, p=weights)
        unknown_idx = rng.integers(0, len(unknown), n)
        words = [
            known[k] if kn else unknown[u]
            for kn, k, u in zip(is_known, known_idx, unknown_idx, strict=True)
        ]
        for j in range(0, n, 12):  # sentences of ~12 words
            words[j] = words[j].capitalize()
            end = min(j + 11, n - 1)
            words[end] += "."
        lines.append(" ".join(words))
    (directory / "vocab.txt").write_text("\n".join(known) + "\n")
    (directory / "lines.txt").write_text("\n".join(lines) + "\n")


_TEXT_CACHE: dict[str, tuple[list[str], dict[str, int]]] = {}


def load_text(data_dir: str) -> tuple[list[str], dict[str, int]]:
    """The lines and the vocabulary (word -> id from 1), read once per process."""
    if data_dir not in _TEXT_CACHE:
        directory = Path(data_dir) / "text"
        lines = (directory / "lines.txt").read_text().splitlines()
        words = (directory / "vocab.txt").read_text().splitlines()
        _TEXT_CACHE[data_dir] = (lines, {w: i + 1 for i, w in enumerate(words)})
    return _TEXT_CACHE[data_dir]


class Tokenize:
    """python_cpu's work: tokenize line ``i``.

    The text is loaded when the function is made (before the timed window; forked workers
    inherit it) and again, lazily, in a process that receives the function by pickle."""

    def __init__(self, data_dir: str) -> None:
        self.data_dir = data_dir
        load_text(data_dir)

    def __call__(self, i: Any) -> np.ndarray:
        lines, vocab = load_text(self.data_dir)
        return tokenize(lines[int(i) % len(lines)], vocab)


# ---------------------------------------------------------------------------------------------
# io_latency: a simulated object-store GET

GET_LATENCY_S = 0.020
PAYLOAD_BYTES = 16 * 1024


class SimulatedGet:
    """io_latency's work: wait 20 ms (the round trip), then return 16 KiB for key ``i``."""

    def __call__(self, i: Any) -> np.ndarray:
        time.sleep(GET_LATENCY_S)
        payload = int(i).to_bytes(8, "little") * (PAYLOAD_BYTES // 8)
        return np.frombuffer(payload, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# image: read, decode, random crop, random flip, normalise

IMAGE_FILES = 2_000
JPEG_SIZE = 256
CROP = 224


def image_path(data_dir: str, i: int) -> str:
    return os.path.join(data_dir, "images", f"{i % IMAGE_FILES:05d}.jpg")


def crop_and_flip(i: int) -> tuple[int, int, bool]:
    """The crop corner and flip of element ``i``, from ``(SEED, i)`` alone."""
    rng = np.random.default_rng((SEED, i))
    top, left = rng.integers(0, JPEG_SIZE - CROP + 1, 2)
    return int(top), int(left), bool(rng.random() < 0.5)


class DecodeAugment:
    """image's work for element ``i``."""

    def __init__(self, data_dir: str) -> None:
        self.data_dir = data_dir

    def __call__(self, i: Any) -> np.ndarray:
        from PIL import Image  # imported here: only this workload needs Pillow

        i = int(i)
        with open(image_path(self.data_dir, i), "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as img:
            pixels = np.asarray(img.convert("RGB"))
        top, left, flip = crop_and_flip(i)
        crop = pixels[top : top + CROP, left : left + CROP]
        if flip:
            crop = crop[:, ::-1]
        x = crop.astype(np.float32)
        x *= np.float32(1 / 255)
        x -= MEAN
        x /= STD
        return x


def _write_images(directory: Path) -> None:
    """Smooth colour fields with shapes and sensor-like noise, so JPEGs have realistic sizes."""
    from PIL import Image

    yy, xx = np.mgrid[0:JPEG_SIZE, 0:JPEG_SIZE].astype(np.float32) / JPEG_SIZE
    for i in range(IMAGE_FILES):
        rng = np.random.default_rng((SEED, 1, i))
        freq = rng.uniform(1, 6, (3, 2))
        phase = rng.uniform(0, 2 * np.pi, 3)
        channels = [
            127 + 100 * np.sin(2 * np.pi * (f[0] * xx + f[1] * yy) + p)
            for f, p in zip(freq, phase, strict=True)
        ]
        img = np.stack(channels, axis=-1)
        cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 8, img.shape)
        pixels = np.clip(img, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(directory / f"{i:05d}.jpg", quality=90)


# ---------------------------------------------------------------------------------------------
# The workload table


@dataclass(frozen=True)
class Sizes:
    """Element counts: BENCHMARKS.md's (full and quick mode, where a time cap shortens runs
    instead), and a tiny count for smoke tests, which check that a pair runs at all."""

    full: int
    smoke: int

    def get(self, mode: str) -> int:
        return self.smoke if mode == "smoke" else self.full


@dataclass(frozen=True)
class Workload:
    name: str
    sizes: Sizes
    batch_size: int
    description: str
    # None: the source elements pass through untouched (consumer_bound).
    make_fn: Callable[[str], ElementFn] | None
    # Output of the element function, for systems that must declare it (tf.numpy_function).
    out_dtype: np.dtype
    out_shape: tuple[int, ...]
    # The source is range(cycle).repeat() when set, else range(elements).
    cycle: int | None = None
    consumer_sleep_s: float = 0.0
    # CPU-bound work has a limit: cores / single-threaded time per element.
    cpu_bound: bool = False
    # Parallelism and prefetch-buffer (in batches) settings the hand-tuned grids try; a
    # parallelism of 0 means none (a sequential map, num_workers=0, num_threads=0).
    parallelism_grid: tuple[int, ...] = (1, 2, 4)
    quick_parallelism_grid: tuple[int, ...] = (2,)
    buffer_grid: tuple[int, ...] = (2, 8)
    quick_buffer_grid: tuple[int, ...] = (4,)
    # Writes the workload's files into data_dir / data_subdir, once.
    prepare: Callable[[Path], None] | None = None
    data_subdir: str = ""

    def element_fn(self, data_dir: str) -> ElementFn | None:
        return None if self.make_fn is None else self.make_fn(data_dir)

    def source(self, elements: int) -> tuple[int, bool]:
        """(stop, repeat): the source is ``range(stop)``, repeated forever if ``repeat``."""
        return (self.cycle, True) if self.cycle else (elements, False)

    def source_index(self, i: int) -> int:
        """The source element at position ``i`` (for systems indexing instead of repeating)."""
        return i % self.cycle if self.cycle else i

    def grid(self, mode: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(parallelism values, buffer sizes) for a hand-tuned grid in ``mode``."""
        if mode == "full":
            return self.parallelism_grid, self.buffer_grid
        # smoke: one setting, enough to prove the grid code runs.
        if mode == "smoke":
            return self.quick_parallelism_grid[:1], self.quick_buffer_grid[:1]
        return self.quick_parallelism_grid, self.quick_buffer_grid


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            name="overhead",
            sizes=Sizes(full=2_000_000, smoke=5_120),
            batch_size=256,
            description="range(2M), x + 1 on a Python int: framework cost per element",
            make_fn=lambda _: add_one,
            out_dtype=np.dtype(np.int64),
            out_shape=(),
            parallelism_grid=(0, 1, 2),
            quick_parallelism_grid=(0, 2),
            # (2, 2) is the runtime issue's yardstick: map(2) + prefetch(2) against the plain loop.
            buffer_grid=(1, 2, 16),
            quick_buffer_grid=(2, 8),
        ),
        Workload(
            name="numpy_cpu",
            sizes=Sizes(full=20_000, smoke=160),
            batch_size=32,
            description="224x224x3 uint8 from default_rng(i); float32, normalise, flip, x2",
            make_fn=lambda _: NumpyAugment(),
            out_dtype=np.dtype(np.float32),
            out_shape=IMAGE_SHAPE,
            cpu_bound=True,
        ),
        Workload(
            name="python_cpu",
            sizes=Sizes(full=20_000, smoke=320),
            batch_size=64,
            description="pure-Python tokenizer of ~300-word lines to 256 int32 ids (holds GIL)",
            make_fn=Tokenize,
            out_dtype=np.dtype(np.int32),
            out_shape=(SEQ_LEN,),
            cpu_bound=True,
            prepare=_write_text,
            data_subdir="text",
        ),
        Workload(
            name="io_latency",
            sizes=Sizes(full=4_000, smoke=192),
            batch_size=32,
            description="sleep 20 ms then 16 KiB per key: a simulated object-store GET",
            make_fn=lambda _: SimulatedGet(),
            out_dtype=np.dtype(np.uint8),
            out_shape=(PAYLOAD_BYTES,),
            parallelism_grid=(8, 16, 32, 64, 128, 256),
            quick_parallelism_grid=(32,),
        ),
        Workload(
            name="consumer_bound",
            sizes=Sizes(full=300 * 64, smoke=20 * 64),
            batch_size=64,
            description="range(1000).repeat(), no work; the consumer sleeps 10 ms per batch",
            make_fn=None,
            out_dtype=np.dtype(np.int64),
            out_shape=(),
            cycle=1000,
            consumer_sleep_s=0.010,
            parallelism_grid=(0, 1),
            quick_parallelism_grid=(1,),
            buffer_grid=(1, 2, 8),
            quick_buffer_grid=(2,),
        ),
        Workload(
            name="image",
            sizes=Sizes(full=IMAGE_FILES, smoke=96),
            batch_size=32,
            description="read a 256x256 JPEG, decode (Pillow), random crop 224, flip, normalise",
            make_fn=DecodeAugment,
            out_dtype=np.dtype(np.float32),
            out_shape=(CROP, CROP, 3),
            cpu_bound=True,
            prepare=_write_images,
            data_subdir="images",
        ),
    )
}


def prepare_data(workload: Workload, data_dir: Path) -> None:
    """Write the workload's files under ``data_dir`` once (kept across runs, keyed by version)."""
    if workload.prepare is None:
        return
    directory = data_dir / workload.data_subdir
    stamp = directory / ".version"
    if stamp.exists() and stamp.read_text() == DATA_VERSION:
        return
    directory.mkdir(parents=True, exist_ok=True)
    workload.prepare(directory)
    stamp.write_text(DATA_VERSION)
