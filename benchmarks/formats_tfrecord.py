"""TFRecord reading and Example parsing: feedline against tf.data and the ``tfrecord`` package,
every system in the same run on the same files (ratios are what the issue's bars ask for).

    .venv/bin/python -m benchmarks.formats_tfrecord [--mib 64] [--repeats 3]

Read + count: each system iterates every record in Python and counts it (what a training loop
does). tf.data also counts in its own C++ (``Dataset.reduce``), a ceiling no Python consumer
reaches, shown for reference. The ``tfrecord`` package neither checks CRCs nor copies records
(it yields views of one reused buffer), so it does less work than feedline and tf.data.

Example parsing: 10-feature Examples, batched, parsed per batch: tf.data's
``batch(b).map(tf.io.parse_example)`` against feedline's ``batch(b)`` with ``fl.io.parse_example``
on each batch, and the ``protobuf`` package (upb) parsing each Example and converting to the
same numpy arrays, the alternative feedline's hand-written decoder was measured against.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import feedline as fl
from feedline.io.example import FixedLenFeature, VarLenFeature, encode_example, parse_example
from feedline.io.tfrecord import TFRecordWriter

FILES = 4


def write_files(directory: str, label: str, record_size: int, total: int) -> list[str]:
    rng = np.random.default_rng(0)
    count = max(FILES, total // record_size)
    paths = []
    for i in range(FILES):
        path = os.path.join(directory, f"{label}-{i}.tfrecord")
        with TFRecordWriter(path) as w:
            for _ in range(count // FILES):
                w.write(rng.bytes(record_size))
        paths.append(path)
    return paths


def example_file(directory: str, count: int) -> str:
    rng = np.random.default_rng(1)
    path = os.path.join(directory, "examples.tfrecord")
    with TFRecordWriter(path) as w:
        for _ in range(count):
            w.write(
                encode_example(
                    {
                        **{f"i{k}": int(rng.integers(0, 1000)) for k in range(4)},
                        **{f"f{k}": rng.random(10, dtype=np.float32) for k in range(3)},
                        **{f"s{k}": rng.bytes(20) for k in range(2)},
                        "v": rng.integers(0, 10**6, int(rng.integers(0, 8))),
                    }
                )
            )
    return path


def timed(run: Callable[[], int]) -> tuple[float, int]:
    """Items per second of one run, and how many items it counted."""
    start = time.perf_counter()
    n = run()
    return n / (time.perf_counter() - start), n


def best_rates(
    systems: dict[str, Callable[[], tuple[float, int]]], repeats: int
) -> dict[str, tuple[float, int]]:
    """Each system's best rate over ``repeats`` rounds, the systems taking turns within a
    round (A-B-C-A-B-C: the machine's drift falls on all of them), each counting the same."""
    best: dict[str, tuple[float, int]] = {}
    for _ in range(repeats):
        for name, run in systems.items():
            rate, n = run()
            if name in best and best[name][1] != n:
                raise AssertionError(f"{name} counted {n}, then {best[name][1]}")
            best[name] = (max(rate, best.get(name, (0.0, n))[0]), n)
    if len({n for _, n in best.values()}) != 1:
        raise AssertionError(f"systems counted different items: {best}")
    return best


def count(iterable: Any) -> int:
    n = 0
    for _ in iterable:
        n += 1
    return n


def tfrecord_package_rate(files: list[str]) -> tuple[float, int]:
    """The ``tfrecord`` package's rate, measured in a child process: its example_pb2
    registers the same protobuf names as TensorFlow's, which cannot share a process."""
    code = f"""
from benchmarks.formats_tfrecord import count, timed
from tfrecord.reader import tfrecord_iterator
print(*timed(lambda: sum(count(tfrecord_iterator(f)) for f in {files!r})))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rate, n = out.stdout.split()
    return float(rate), int(n)


def read_rows(tf: Any, files: list[str], repeats: int) -> dict[str, tuple[float, int]]:
    return best_rates(
        {
            "feedline": lambda: timed(lambda: count(fl.TFRecordDataset(files))),
            "tf.data (Python loop)": lambda: timed(lambda: count(tf.data.TFRecordDataset(files))),
            "tf.data (C++ count)": lambda: timed(
                lambda: int(tf.data.TFRecordDataset(files).reduce(0, lambda c, _: c + 1))
            ),
            "tfrecord package": lambda: tfrecord_package_rate(files),
        },
        repeats,
    )


def tf_features(tf: Any) -> dict[str, Any]:
    return {
        **{f"i{k}": tf.io.FixedLenFeature([], tf.int64) for k in range(4)},
        **{f"f{k}": tf.io.FixedLenFeature([10], tf.float32) for k in range(3)},
        **{f"s{k}": tf.io.FixedLenFeature([], tf.string) for k in range(2)},
        "v": tf.io.VarLenFeature(tf.int64),
    }


FEATURES: dict[str, Any] = {
    **{f"i{k}": FixedLenFeature([], "int64") for k in range(4)},
    **{f"f{k}": FixedLenFeature([10], "float32") for k in range(3)},
    **{f"s{k}": FixedLenFeature([], "string") for k in range(2)},
    "v": VarLenFeature("int64"),
}


def protobuf_parse(example_class: Any) -> Callable[[Any], dict[str, Any]]:
    """parse_example through the protobuf package: the same outputs, per Example."""

    def parse(batch: Any) -> dict[str, Any]:
        rows = [example_class.FromString(b).features.feature for b in batch]
        out: dict[str, Any] = {}
        for k in range(4):
            out[f"i{k}"] = np.array([r[f"i{k}"].int64_list.value[0] for r in rows], np.int64)
        for k in range(3):
            out[f"f{k}"] = np.array([r[f"f{k}"].float_list.value for r in rows], np.float32)
        for k in range(2):
            out[f"s{k}"] = np.array([r[f"s{k}"].bytes_list.value[0] for r in rows], object)
        out["v"] = [np.array(r["v"].int64_list.value, np.int64) for r in rows]
        return out

    return parse


def parse_rows(tf: Any, path: str, batch: int, repeats: int) -> dict[str, tuple[float, int]]:
    from tensorflow.core.example import example_pb2

    spec = tf_features(tf)
    by_protobuf = protobuf_parse(example_pb2.Example)

    def rows(ds: Any, parse: Callable[[Any], dict[str, Any]] | None = None) -> int:
        n = 0
        for batch in ds:
            parsed = batch if parse is None else parse(batch)
            n += len(parsed["i0"])
        return n

    # feedline parses in the loop, not in a map: a map's outputs become arrays, and a
    # VarLenFeature's list of ragged arrays is not one (tf.data gives a SparseTensor).
    return best_rates(
        {
            "feedline parse_example": lambda: timed(
                lambda: rows(
                    fl.TFRecordDataset(path).batch(batch), lambda b: parse_example(b, FEATURES)
                )
            ),
            "tf.data map(parse_example)": lambda: timed(
                lambda: rows(
                    tf.data.TFRecordDataset(path)
                    .batch(batch)
                    .map(lambda b: tf.io.parse_example(b, spec))
                )
            ),
            "protobuf (upb) per Example": lambda: timed(
                lambda: rows(fl.TFRecordDataset(path).batch(batch), by_protobuf)
            ),
        },
        repeats,
    )


def table(title: str, rows: dict[str, tuple[float, int]], unit: str, scale: float) -> None:
    base = rows[next(iter(rows))][0]
    print(f"\n{title}")
    print(f"| system | {unit} | feedline / system |")
    print("|---|---|---|")
    for name, (rate, _) in rows.items():
        print(f"| {name} | {rate * scale:,.1f} | {base / rate:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=64, help="MiB of records per size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--examples", type=int, default=20_000)
    args = parser.parse_args()
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="feedline-bench-tfrecord-") as directory:
        for label, size in [("1KiB", 1024), ("100KiB", 100 * 1024)]:
            files = write_files(directory, label, size, args.mib << 20)
            rows = read_rows(tf, files, args.repeats)
            n = rows["feedline"][1]
            table(
                f"read + count, {n} records of {label}, uncompressed", rows, "MiB/s", size / 2**20
            )
        path = example_file(directory, args.examples)
        for batch in (32, 256):
            rows = parse_rows(tf, path, batch, args.repeats)
            table(
                f"TFRecord + parse of {args.examples} 10-feature Examples, batches of {batch}",
                rows,
                "thousand Examples/s",
                1e-3,
            )


if __name__ == "__main__":
    main()
