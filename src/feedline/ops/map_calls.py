"""A map's calls over a chunk of elements: the hot loop of every map (inline, on threads, in
worker processes), its outputs converted the way tf.data converts a function's results and
checked against the traced spec."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from feedline.errors import wrap_user_error
from feedline.ops.randomness import PassKey, PassKeys
from feedline.ops.tracing import OutputCheck
from feedline.runtime.chunks import Failed, Transform
from feedline.runtime.timeouts import call_within
from feedline.structure import normalize_output, sole_type

# Values a user function commonly returns that need no conversion: checked by exact type so
# the hot path pays one set lookup per element.
_NO_CONVERSION = frozenset(
    {np.ndarray, bytes, np.int64, np.int32, np.float32, np.float64, np.bool_, np.uint8}
)


def map_transform(
    fn: Callable[..., Any],
    name: str,
    key: PassKey | None,
    timeout: float | None = None,
    check: OutputCheck | None = None,
) -> Transform:
    """The chunk transform of a map (``key`` None) or of one pass of a random_map; each call
    limited to ``timeout`` seconds if given, its outputs checked by ``check`` if given (in
    the transform, so wherever it runs: inline, on threads, in worker processes)."""
    calls = _calls(fn, name, key, timeout)
    # Outputs all of this type fit the spec and need no conversion: one pass over their
    # types, where converting and checking take one each (x + 1 ran 10% slower with both).
    plain = check.plain_type if check is not None else None

    def transform(raw: list[Any], positions: Sequence[int]) -> tuple[list[Any], list[int]]:
        outputs, failures = calls(raw, positions)
        if plain is not None and not failures and sole_type(outputs) is plain:
            return outputs, failures
        outputs, failures = _normalized(outputs, failures, positions, name)
        if check is None:
            return outputs, failures
        return check.mark(outputs, failures, positions)

    return transform


def _calls(
    fn: Callable[..., Any], name: str, key: PassKey | None, timeout: float | None
) -> Transform:
    if key is None and timeout is None:
        return lambda raw, positions: map_chunk(fn, raw, positions, name)

    def call(element: Any, position: int) -> Any:
        if key is None:
            return fn(*element) if type(element) is tuple else fn(element)
        # The generator depends only on (pass key, position): the same at any parallelism,
        # on any worker (thread or process), and after a restore.
        rng = PassKeys.generator(key, position)
        return fn(*element, rng) if type(element) is tuple else fn(element, rng)

    if timeout is None:
        return lambda raw, positions: map_chunk_with_positions(call, raw, positions, name)

    def within(element: Any, position: int) -> Any:
        return call_within(timeout, call, element, position)

    return lambda raw, positions: map_chunk_with_positions(within, raw, positions, name)


def map_chunk(
    fn: Callable[..., Any], raw: list[Any], positions: Sequence[int], name: str
) -> tuple[list[Any], list[int]]:
    """``fn`` over a chunk; a failing element becomes ``Failed`` in its place and the chunk
    goes on, so errors surface at their own position. The hot loop of every map."""
    if type(raw[0]) is Failed:  # an upstream error always arrives as a chunk of its own
        return raw, [0]
    out: list[Any] = []
    failures: list[int] = []
    append = out.append
    # Per-chunk decisions, made at C speed, keep the per-element loop to a bare call.
    only = sole_type(raw)
    unpack = only is tuple if only is not None else tuple in set(map(type, raw))
    elements = iter(raw)
    while True:
        try:
            if unpack:
                for x in elements:
                    append(fn(*x) if type(x) is tuple else fn(x))
            else:
                for x in elements:
                    append(fn(x))
            break
        except Exception as e:
            failures.append(len(out))
            append(Failed(wrap_user_error(name, positions[len(out)], e)))
    return out, failures


def _normalized(
    outputs: list[Any], failures: list[int], positions: Sequence[int], name: str
) -> tuple[list[Any], list[int]]:
    """Outputs converted the way tf.data converts a function's results (rarely needed), and
    the failures with those that cannot be (a list of arrays of different lengths): each
    fails its own element, as the function raising would."""
    if sole_type(outputs) in _NO_CONVERSION or set(map(type, outputs)) <= _NO_CONVERSION:
        return outputs, failures
    converted: list[Any] = []
    failed = set(failures)
    for i, y in enumerate(outputs):
        if type(y) in _NO_CONVERSION or type(y) is Failed:
            converted.append(y)
            continue
        try:
            converted.append(normalize_output(y))
        except (TypeError, ValueError) as e:
            failed.add(i)
            error = TypeError(
                f"its output cannot be an element ({e}); a list of arrays of different "
                "lengths (parse_example's VarLenFeature) is no tensor: parse each element with "
                "parse_single_example before batch(), or use ragged_batch()"
            )
            converted.append(Failed(wrap_user_error(name, positions[i], error)))
    return converted, sorted(failed)


def map_chunk_with_positions(
    fn: Callable[[Any, int], Any], raw: list[Any], positions: Sequence[int], name: str
) -> tuple[list[Any], list[int]]:
    """Like ``map_chunk`` for functions that also take the element's position."""
    if type(raw[0]) is Failed:
        return raw, [0]
    out: list[Any] = []
    failures: list[int] = []
    append = out.append
    pairs = zip(raw, positions)
    while True:
        try:
            for x, position in pairs:
                append(fn(x, position))
            break
        except Exception as e:
            failures.append(len(out))
            append(Failed(wrap_user_error(name, positions[len(out)], e)))
    return out, failures
