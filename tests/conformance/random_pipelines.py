"""Random pipelines written once, as text over ``m`` (``tf.data`` or ``feedline``), for the
conformance suite to compare element by element: a source, a chain of ops on int64 scalars,
and an ending (batches, tuples, dicts, ragged vectors padded or unbatched).

Each choice uses only what both libraries take the same way: arithmetic, indexing and the
Dataset methods. Map parallelism and prefetch depths are drawn too, AUTOTUNE among them: they
may change how fast elements come, never which or in what order.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np


def _calls(r: random.Random) -> str:
    return r.choice(["", "", ", num_parallel_calls=2", ", num_parallel_calls=m.AUTOTUNE"])


def _source(r: random.Random) -> str:
    a = r.randint(0, 15)
    return r.choice(
        [
            f"m.Dataset.range({a})",
            f"m.Dataset.range({a}, {a + r.randint(0, 30)}, {r.randint(1, 4)})",
            f"m.Dataset.from_tensor_slices(np.arange({a}, dtype=np.int64) * 3)",
            f"m.Dataset.zip((m.Dataset.range({a}), m.Dataset.range(3, {a + 5})))"
            ".map(lambda x, y: x * y)",
        ]
    )


def _scalar_op(r: random.Random) -> str:
    """An op from int64 scalars to int64 scalars."""
    k = r.randint(1, 5)
    ops: list[Callable[[], str]] = [
        lambda: f".map(lambda x: x * {k} + 1{_calls(r)})",
        lambda: f".map(lambda x: x // {k}{_calls(r)})",
        lambda: f".map(lambda x: x % {k + 2}{_calls(r)})",
        lambda: f".filter(lambda x: x % {k + 1} != 0)",
        lambda: f".take({r.randint(0, 20)})",
        lambda: f".skip({r.randint(0, 6)})",
        lambda: f".repeat({r.randint(0, 3)})",
        lambda: f".concatenate(m.Dataset.range({r.randint(0, 5)}, {r.randint(5, 12)}))",
        lambda: f".batch({k}, drop_remainder={r.random() < 0.4}).unbatch()",
        lambda: (
            ".interleave(lambda x: m.Dataset.range(x % 4).map(lambda y: y + 10 * x), "
            f"cycle_length={r.randint(1, 4)}, block_length={r.randint(1, 3)})"
        ),
        lambda: ".flat_map(lambda x: m.Dataset.range(x % 3))",
        lambda: ".enumerate().map(lambda i, x: i * 100 + x)",
        lambda: f".prefetch({r.choice(['1', '3', 'm.AUTOTUNE'])})",
        lambda: ".cache()",
        lambda: f".shard({k + 1}, {r.randint(0, k)})",
        lambda: f".take_while(lambda x: x < {r.randint(3, 40)})",
        lambda: ".scan(np.int64(0), lambda s, x: (s + x, s * 2 + x))",
        lambda: ".unique()",
        lambda: (
            f".window({k}, shift={r.randint(1, 3)}, drop_remainder={r.random() < 0.5})"
            f".flat_map(lambda w: w.batch({k})).map(lambda b: b[0] + b[-1])"
        ),
        lambda: (
            ".group_by_window(key_func=lambda x: x % 2, "
            f"reduce_func=lambda key, w: w.batch({k}), window_size={k}).unbatch()"
        ),
        lambda: f".map(lambda x: (x, x * 2)).map(lambda a, b: a + b{_calls(r)})",
        lambda: ".map(lambda x: {'a': x, 'b': x + 1}).map(lambda d: d['b'] - d['a'] + d['a'])",
    ]
    return r.choice(ops)()


def _vectors(r: random.Random) -> str:
    """Batches into rank-1 elements of uneven length (the last may be short), ops on them,
    then an ending."""
    k = r.randint(1, 4)
    code = f".batch({k + 1})"
    for _ in range(r.randint(0, 3)):
        j = r.randint(1, 4)
        code += r.choice(
            [
                f".map(lambda v: v * 2{_calls(r)})",
                ".map(lambda v: v[::-1])",
                ".map(lambda v: v[1:])",
                f".map(lambda v: (v, v[:1]){_calls(r)}).map(lambda a, b: a)",
                f".padded_batch({j}).unbatch()",
                f".padded_batch({j}, padded_shapes=[{k + 3}], padding_values=np.int64(-1))"
                ".unbatch()",
                ".unbatch().batch(2)",
                f".rebatch({j})",
            ]
        )
    return code + r.choice(["", f".padded_batch({r.randint(1, 3)})", ".unbatch()"])


def _ending(r: random.Random) -> str:
    k = r.randint(1, 5)
    return r.choice(
        [
            "",
            f".batch({k}, drop_remainder={r.random() < 0.4})",
            f".map(lambda x: (x, x / 2)).batch({k})",
            f".map(lambda x: {{'x': x, 'y': x > 3}}).batch({k}, drop_remainder={r.random() < 0.5})",
            f".padded_batch({k})",
            f".batch({k}).map(lambda b: b * 2).unbatch().batch({k + 1})",
        ]
    )


def pipeline_code(seed: int) -> str:
    """The pipeline of ``seed``, as the text of an expression over ``m`` and ``np``."""
    r = random.Random(seed)
    code = _source(r)
    for _ in range(r.randint(1, 5)):
        code += _scalar_op(r)
    return code + (_vectors(r) if r.random() < 0.35 else _ending(r))


def build(code: str) -> Callable[[Any], Any]:
    """A builder for the conformance checks: ``code`` evaluated with ``m`` the module."""
    return lambda m: eval(code, {"m": m, "np": np})  # the suite's own text, never a file's
