"""Parquet and image-folder reading: feedline against pyarrow and the PyTorch DataLoader, every
system in the same run on the same files (ratios are what issue #18's bars ask for).

    .venv/bin/python -m benchmarks.formats_columnar [--rows 200000] [--files 8] [--images 1200]
        [--repeats 3]

Parquet, 10 numeric columns: feedline's ``ParquetDataset`` iterated row by row against
pyarrow's own ``ParquetFile.iter_batches`` with each batch converted to the same rows (a dict
of numpy scalars per row), at two file sizes (``--rows`` and ten times it). The two take
turns in one process for the rates (a change in the machine's load then hits both); one more
pass of each in a fresh process gives its peak RSS above the interpreter with its imports
(``VmHWM``), the reader's alone: it should not grow with the file. Then the same over
``--files`` files of ``--rows`` rows each, with feedline reading them one after another
(``num_parallel_reads=None``) and with ``num_parallel_reads=AUTOTUNE``, against pyarrow's
loop over the files.

Images: JPEG files decoded, resized to 224x224 and batched by 32, by the same Python function:
feedline (``map(num_parallel_calls=AUTOTUNE).batch(32).prefetch(AUTOTUNE)``) against the
DataLoader's best ``num_workers``. And ``decode_image``'s two JPEG decoders (simplejpeg,
Pillow) on the same files, one thread.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

import feedline as fl
from feedline.io.fs import as_name

COLUMNS = 10
ROW_GROUP = 65536
SIZE = 224


def write_table(path: str, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    dtypes = ["int64", "float64", "int32", "float32"]
    writer = None
    for start in range(0, rows, ROW_GROUP):
        n = min(ROW_GROUP, rows - start)
        table = pa.table(
            {
                f"c{k}": (rng.random(n) * 1000).astype(dtypes[k % len(dtypes)])
                for k in range(COLUMNS)
            }
        )
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=ROW_GROUP)
    assert writer is not None
    writer.close()


def pyarrow_rows(paths: list[str]) -> int:
    import pyarrow.parquet as pq

    count = 0
    for path in paths:
        with pq.ParquetFile(path) as f:
            names = f.schema_arrow.names
            for batch in f.iter_batches(batch_size=ROW_GROUP):
                columns = [c.to_numpy(zero_copy_only=False) for c in batch.columns]
                for values in zip(*columns):
                    row = dict(zip(names, values))
                    count += row is not None
    return count


def feedline_rows(paths: list[str], reads: int | None = None) -> int:
    count = 0
    with fl.io.ParquetDataset(paths, num_parallel_reads=reads).iterator() as it:
        for row in it:
            count += row is not None
    return count


SYSTEMS: dict[str, Callable[[list[str]], int]] = {
    "pyarrow": pyarrow_rows,
    "feedline": feedline_rows,
    "feedline-autotune": functools.partial(feedline_rows, reads=fl.AUTOTUNE),
}


def high_water_kib() -> int:
    """This process's peak resident memory: VmHWM, which belongs to the process's own
    memory (``ru_maxrss`` would carry over the parent's peak through fork and exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(system: str, paths: list[str]) -> None:
    """One pass of one system over the files in a fresh process: its peak RSS growth."""
    import pyarrow.parquet  # noqa: F401 - imported before the baseline reading

    base = high_water_kib()
    SYSTEMS[system](paths)
    print(json.dumps({"peak_mib": (high_water_kib() - base) / 1024}))


def peak_mib(system: str, paths: list[str]) -> float:
    command = [sys.executable, "-m", "benchmarks.formats_columnar", "--child", system, *paths]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"])


def parquet(directory: str, rows: int, repeats: int) -> None:
    print(
        f"\nParquet, {COLUMNS} numeric columns, row groups of {ROW_GROUP} rows: rows/s (best of"
        f" {repeats}, the systems taking turns in one process) and peak RSS growth (one pass"
        " in a fresh process)"
    )
    systems = {k: SYSTEMS[k] for k in ("pyarrow", "feedline")}
    for n in (rows, rows * 10):
        paths = [os.path.join(directory, f"t{n}.parquet")]
        write_table(paths[0], n)
        size = os.path.getsize(paths[0]) / 2**20
        best = in_turns({k: functools.partial(run, paths) for k, run in systems.items()}, repeats)
        theirs, ours = best["pyarrow"], best["feedline"]
        print(
            f"  {n:>9} rows ({size:6.1f} MiB): pyarrow iter_batches {theirs[0]:>10,.0f}"
            f" ({peak_mib('pyarrow', paths):5.0f} MiB)  feedline {ours[0]:>10,.0f}"
            f" ({peak_mib('feedline', paths):5.0f} MiB)  ratio {ours[0] / theirs[0]:.2f}"
            f" (by CPU time {ours[1] / theirs[1]:.2f})"
        )


def parquet_files(directory: str, rows: int, files: int, repeats: int) -> None:
    """Several files: feedline file after file and with num_parallel_reads=AUTOTUNE (threads
    of its own, so by the wall clock only), against pyarrow's loop over the same files."""
    paths = []
    for k in range(files):
        paths.append(os.path.join(directory, f"part{k}.parquet"))
        write_table(paths[-1], rows)
    size = sum(os.path.getsize(p) for p in paths) / 2**20
    best = in_turns({k: functools.partial(run, paths) for k, run in SYSTEMS.items()}, repeats)
    rate = {k: wall for k, (wall, _) in best.items()}
    print(
        f"\nParquet, {files} files of {rows} rows ({size:.1f} MiB): rows/s (best of {repeats},"
        " in turns) and peak RSS growth (one pass in a fresh process)"
    )
    for name in SYSTEMS:
        label = {
            "pyarrow": "pyarrow iter_batches, file after file",
            "feedline": "feedline num_parallel_reads=None",
            "feedline-autotune": "feedline num_parallel_reads=AUTOTUNE",
        }[name]
        print(f"  {label:<40} {rate[name]:>10,.0f}  ({peak_mib(name, paths):5.0f} MiB)")
    tuned, plain, theirs = rate["feedline-autotune"], rate["feedline"], rate["pyarrow"]
    print(
        f"  ratios: AUTOTUNE / None {tuned / plain:.2f}, AUTOTUNE / pyarrow {tuned / theirs:.2f},"
        f" None / pyarrow {plain / theirs:.2f}"
    )


def write_jpegs(directory: str, count: int) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        base = np.cumsum(rng.integers(-8, 9, (300, 400, 3)), axis=1) + 128
        path = os.path.join(directory, f"img{i:05d}.jpg")
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def load(path: Any) -> np.ndarray:
    """The per-image work both systems run: read, decode, resize."""
    from PIL import Image

    with open(as_name(path), "rb") as f:
        pixels = fl.io.decode_image(f.read(), 3)
    resized = Image.fromarray(pixels).resize((SIZE, SIZE), Image.BILINEAR)
    return np.array(resized)  # writable, as torch.as_tensor wants


class _TorchImages:
    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        return load(self.paths[i])


def in_turns(runs: dict[str, Callable[[], int]], repeats: int) -> dict[str, tuple[float, float]]:
    """Each run's best items/s over ``repeats`` rounds, by the wall clock and by this
    process's CPU time (steadier on a shared machine; meaningful only for work done in this
    process). The runs take turns in each round, so a change in the machine's load hits all."""
    best = dict.fromkeys(runs, (0.0, 0.0))
    for _ in range(repeats):
        for name, run in runs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            n = run()
            wall = n / (time.perf_counter() - start)
            cpu = n / max(time.process_time() - start_cpu, 1e-9)
            best[name] = (max(best[name][0], wall), max(best[name][1], cpu))
    return best


def images(directory: str, count: int, repeats: int) -> None:
    import torch

    # Its advice that 4 workers exceed the cores: the grid tries them on purpose.
    warnings.filterwarnings("ignore", message="This DataLoader will create")

    paths = write_jpegs(directory, count)

    def feedline_run() -> int:
        ds = (
            fl.Dataset.from_tensor_slices(paths)
            .map(load, num_parallel_calls=fl.AUTOTUNE)
            .batch(32)
            .prefetch(fl.AUTOTUNE)
        )
        with ds.iterator() as it:
            return sum(len(b) for b in it)

    def torch_run(workers: int) -> Callable[[], int]:
        def run() -> int:
            loader = torch.utils.data.DataLoader(
                _TorchImages(paths),
                batch_size=32,
                num_workers=workers,
                persistent_workers=False,
            )
            return sum(len(b) for b in loader)

        return run

    print(
        f"\nImage folder: {count} JPEGs 400x300 -> decode, resize to {SIZE}x{SIZE}, batch 32;"
        f" images/s (best of {repeats}, in turns)"
    )
    runs = {"feedline": feedline_run, **{str(w): torch_run(w) for w in (0, 1, 2, 4)}}
    got = {name: wall for name, (wall, _) in in_turns(runs, repeats).items()}
    ours = got.pop("feedline")
    best = max(got, key=lambda w: got[w])
    for w, r in got.items():
        print(f"  DataLoader num_workers={w}: {r:8,.0f}")
    print(
        f"  feedline AUTOTUNE:         {ours:8,.0f}   ratio to the DataLoader's best "
        f"(num_workers={best}): {ours / got[best]:.2f}"
    )

    from feedline.io import images as decoders

    blobs = []
    for p in paths[:200]:
        with open(p, "rb") as f:
            blobs.append(f.read())

    def decode_all() -> int:
        for blob in blobs:
            fl.io.decode_image(blob)
        return len(blobs)

    def pillow_all() -> int:
        original = decoders._simplejpeg
        decoders._simplejpeg = lambda: None  # type: ignore[assignment]
        try:
            return decode_all()
        finally:
            decoders._simplejpeg = original

    got_both = in_turns({"simplejpeg": decode_all, "pillow": pillow_all}, repeats)
    (fast, fast_cpu), (slow, slow_cpu) = got_both["simplejpeg"], got_both["pillow"]
    print(
        f"\ndecode_image, 400x300 JPEG, one thread: simplejpeg {fast:,.0f}/s, Pillow {slow:,.0f}/s,"
        f" ratio {fast / slow:.2f} (by CPU time {fast_cpu / slow_cpu:.2f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs="+", metavar="SYSTEM PATH")
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1:])
        return
    print(f"cores: {os.cpu_count()}, feedline {fl.__version__}")
    with tempfile.TemporaryDirectory() as directory:
        parquet(directory, args.rows, args.repeats)
        parquet_files(directory, args.rows, args.files, args.repeats)
        images(directory, args.images, args.repeats)


if __name__ == "__main__":
    main()
