"""A plain-Python reference for each op over lists of elements, for property tests.

Written for obviousness, not speed: every op is a few lines over a whole list, following
tf.data's documented semantics. Elements are numpy values (so dtypes compare exactly with
feedline's); batches are ``np.stack``-ed. Functions passed in (``fn``, ``predicate``) take one
element, or a tuple's parts as separate arguments, as tf.data calls them.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

Element = Any
Elements = list[Element]


def call(fn: Callable[..., Any], element: Element) -> Any:
    return fn(*element) if type(element) is tuple else fn(element)


def range_(start: int, stop: int, step: int = 1) -> Elements:
    return [np.int64(v) for v in range(start, stop, step)]


def from_tensor_slices(tensors: Any) -> Elements:
    """Rows of an array, or of every array in a (dict/tuple) nest, along the first axis."""
    if isinstance(tensors, dict):
        columns = {k: from_tensor_slices(v) for k, v in tensors.items()}
        n = len(next(iter(columns.values())))
        return [{k: columns[k][i] for k in sorted(columns)} for i in range(n)]
    if isinstance(tensors, tuple):
        parts = [from_tensor_slices(t) for t in tensors]
        return [tuple(p[i] for p in parts) for i in range(len(parts[0]))]
    return list(np.asarray(tensors))


def map_(xs: Elements, fn: Callable[..., Any]) -> Elements:
    return [call(fn, x) for x in xs]


def filter_(xs: Elements, predicate: Callable[..., Any]) -> Elements:
    return [x for x in xs if call(predicate, x)]


def take_while(xs: Elements, predicate: Callable[..., Any]) -> Elements:
    return list(itertools.takewhile(lambda x: call(predicate, x), xs))


def take(xs: Elements, count: int) -> Elements:
    return list(xs) if count < 0 else xs[:count]


def skip(xs: Elements, count: int) -> Elements:
    return [] if count < 0 else xs[count:]


def shard(xs: Elements, num_shards: int, index: int) -> Elements:
    return xs[index::num_shards]


def repeat(xs: Elements, count: int) -> Elements:
    return xs * count


def enumerate_(xs: Elements, start: int = 0) -> Elements:
    return [(np.int64(start + i), x) for i, x in enumerate(xs)]


def concatenate(a: Elements, b: Elements) -> Elements:
    return a + b


def zip_(*lists: Elements) -> Elements:
    return list(zip(*lists))


def _chunks(xs: Elements, size: int, drop_remainder: bool) -> list[Elements]:
    chunks = [xs[i : i + size] for i in range(0, len(xs), size)]
    if drop_remainder and chunks and len(chunks[-1]) < size:
        chunks.pop()
    return chunks


def _stack(chunk: Elements) -> Any:
    """Stack a list of elements leaf-wise (elements may be tuples or dicts of leaves)."""
    first = chunk[0]
    if isinstance(first, dict):
        return {k: _stack([e[k] for e in chunk]) for k in first}
    if isinstance(first, tuple):
        return tuple(_stack([e[i] for e in chunk]) for i in range(len(first)))
    if isinstance(first, bytes):
        # Strings batch to an object array of bytes, as tf.data's as_numpy_iterator gives.
        out = np.empty(len(chunk), dtype=object)
        out[:] = chunk
        return out
    return np.stack([np.asarray(e) for e in chunk])


def batch(xs: Elements, size: int, drop_remainder: bool = False) -> Elements:
    return [_stack(c) for c in _chunks(xs, size, drop_remainder)]


def padded_batch(
    xs: Elements,
    size: int,
    padded_shape: Sequence[int] | None = None,
    padding_value: Any = 0,
    drop_remainder: bool = False,
) -> Elements:
    """Batches of one-leaf elements, each padded (at the end of every dimension) to
    ``padded_shape``, or to the largest size in the batch when it is None."""
    out = []
    for chunk in _chunks(xs, size, drop_remainder):
        arrays = [np.asarray(x) for x in chunk]
        rank = arrays[0].ndim
        shape = padded_shape or [max(a.shape[d] for a in arrays) for d in range(rank)]
        padded = np.full((len(arrays), *shape), padding_value, dtype=arrays[0].dtype)
        for i, a in enumerate(arrays):
            corner: tuple[Any, ...] = (i, *(slice(0, n) for n in a.shape))
            padded[corner] = a
        out.append(padded)
    return out


def unbatch(xs: Elements) -> Elements:
    """Rows of every element; a tuple/dict element is split leaf by leaf, like slices."""
    return [row for x in xs for row in from_tensor_slices(x)]


def rebatch(xs: Elements, sizes: Sequence[int], drop_remainder: bool = False) -> Elements:
    """Rows re-grouped into batches whose sizes cycle through ``sizes``."""
    rows = unbatch(xs)
    out = []
    start = 0
    for size in itertools.cycle(sizes):
        if start >= len(rows):
            break
        chunk = rows[start : start + size]
        if drop_remainder and len(chunk) < size:
            break
        out.append(_stack(chunk))
        start += size
    return out


def interleave(
    xs: Elements, fn: Callable[..., Elements], cycle_length: int, block_length: int = 1
) -> Elements:
    """tf.data's rule: slots are filled lazily as the cycle reaches them; a slot that runs dry
    is emptied and the cycle moves on; reaching an empty slot opens the next input element
    there; the end comes when the input is exhausted and every slot is empty."""
    inputs = iter(xs)
    slots: list[Iterator[Element] | None] = [None] * cycle_length
    input_done = False
    out: Elements = []
    i = 0
    while not (input_done and all(s is None for s in slots)):
        if slots[i] is None and not input_done:
            try:
                slots[i] = iter(call(fn, next(inputs)))
            except StopIteration:
                input_done = True
        slot = slots[i]
        if slot is not None:
            for _ in range(block_length):
                try:
                    out.append(next(slot))
                except StopIteration:
                    slots[i] = None
                    break
        i = (i + 1) % cycle_length
    return out


def flat_map(xs: Elements, fn: Callable[..., Elements]) -> Elements:
    return [y for x in xs for y in call(fn, x)]


def _key(element: Element) -> str:
    return repr(element if np.ndim(element) == 0 else np.asarray(element).tolist())


def is_permutation(got: Elements, want: Elements) -> bool:
    """Same elements with the same multiplicities, in any order (shuffle's guarantee)."""
    return Counter(map(_key, got)) == Counter(map(_key, want))
