"""Element specs of what a user function returns, found by running it.

tf.data knows a function's output spec by tracing it on symbolic tensors. feedline runs the
function instead: on the first two real input elements, and on synthetic inputs (zeros, empty
strings) whose open dimensions, if the input's spec leaves any, take two different sizes. An
output dimension that differs between those calls is open (``None``) in the result, as
tf.data's tracing would find. A function that fails on synthetic input just contributes
nothing.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from feedline.ops.base import Op, UnobservableSpec
from feedline.ops.in_memory import DatasetSpec
from feedline.runtime.context import IterContext
from feedline.structure import STRING_DTYPE, TensorSpec, map_structure, merge_specs, spec_of

# Sizes given to open dimensions of synthetic inputs: two, so that any dimension depending on
# them shows up as different.
SYNTHETIC_SIZES = (1, 2)
# Real elements a function is run on: two, so that an output shape depending on the input's
# values (np.zeros(x)) shows up as different too.
REAL_ELEMENTS = 2


def first_elements(op: Op, n: int) -> list[Any]:
    """Up to ``n`` first elements of a probe pass over ``op``."""
    it = op.make_iterator(IterContext(probe=True), None)
    try:
        return it.next_chunk(n)
    finally:
        it.close()


def _has_open_dims(spec: Any) -> bool:
    return any(
        isinstance(s, TensorSpec) and (s.shape is None or None in s.shape) for s in _leaves(spec)
    )


def _leaves(spec: Any) -> list[TensorSpec]:
    out: list[TensorSpec] = []
    map_structure(out.append, spec)
    return out


def synthetic_element(spec: Any, size: int) -> Any:
    """An element matching ``spec``, with every open dimension of length ``size``."""

    def make(s: Any) -> Any:
        if isinstance(s, DatasetSpec):  # a window: an empty dataset of its element spec
            from feedline.dataset import Dataset

            return Dataset.from_generator(lambda: iter(()), output_signature=s.element_spec)
        shape = () if s.shape is None else tuple(size if d is None else d for d in s.shape)
        if s.dtype == STRING_DTYPE:
            if not shape:
                return b""
            out = np.empty(shape, dtype=object)
            out.fill(b"")
            return out
        value = np.zeros(shape, dtype=s.dtype)
        return value[()] if not shape else value

    return map_structure(make, spec)


def traced_spec(input_op: Op, output_spec_of: Callable[[Any], Any], name: str) -> Any:
    """The spec of ``output_spec_of(element)`` over every element ``input_op`` may produce."""
    try:
        real = first_elements(input_op, REAL_ELEMENTS)
    except Exception:  # an upstream error: this is only a look at the data, not a pass
        real = []
    try:
        input_spec = input_op.element_spec()
    except UnobservableSpec:
        input_spec = None
    synthetic = []
    if input_spec is not None:
        if not real or _has_open_dims(input_spec):
            synthetic = [synthetic_element(input_spec, size) for size in SYNTHETIC_SIZES]
        else:
            # Zeros too: the first real elements may agree by chance (two lines of one length)
            # where the output's shape depends on the input's values.
            synthetic = [synthetic_element(input_spec, SYNTHETIC_SIZES[0])]
    specs = []
    failures: list[Exception] = []

    def run_on(element: Any) -> None:
        try:
            specs.append(output_spec_of(element))
        except Exception as e:  # a function may fail on some input: that element says nothing
            failures.append(e)

    for element in real:
        run_on(element)
    # What zeros make a function warn about (1 / x) is not the user's data: no warnings.
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for element in synthetic:
            run_on(element)
    failure = failures[0] if failures else None
    if not specs:
        raise UnobservableSpec(
            f"cannot infer the element spec of {name}: the function produced no output on the "
            "first input elements nor on synthetic ones"
        ) from failure
    merged = specs[0]
    for spec in itertools.islice(specs, 1, None):
        try:
            merged = merge_specs(merged, spec)
        except TypeError:
            continue  # a synthetic input took the function down another branch: ignore it
    return merged


def outputs_spec(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``output_spec_of`` for a function returning elements."""
    return lambda element: spec_of(fn(element))
