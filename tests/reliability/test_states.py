"""Iterator states as untrusted input: real states, mutated, must never be read silently wrong.

A state comes back from a user's checkpoint, where it may have been damaged, edited, or saved
from another pipeline. For many pipelines, real states are taken at every point of a pass and
mutated (a key removed, a type changed, an int negated or enlarged, a list cut short, a part
replaced by a part of another pipeline's state). Resuming from a mutated state must either
raise ``InvalidStateError`` before any element (at ``ds.iterator(state)``, ``set_state`` or the
first ``next()``), or resume a pass; never raise anything else, never hang. Mutations no
pipeline could have written (a key missing, a value of the wrong type) must be rejected.
Unmutated states must resume exactly: before + after equal one uninterrupted pass.
"""

from __future__ import annotations

import copy
import gzip
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import feedline as fl
from feedline.errors import InvalidStateError
from tests.helpers import assert_elements_equal, assert_state_rejected, saved_state
from tests.reliability.figures import record

D = fl.Dataset
I64 = fl.TensorSpec((), np.dtype(np.int64))
# Examples (one mutated state each) per pipeline: bounds the module's time.
MUTATIONS = 100

NodePath = tuple[str | int, ...]


def _numbers() -> Iterator[int]:
    yield from range(7)


def _long_short(x: Any) -> Any:
    return np.arange(int(x) % 4 + 1, dtype=np.int32)


def _length(x: Any) -> Any:
    return np.int32(len(x))


def _texts(root: Path) -> list[str]:
    names = []
    for i, data in enumerate([b"a\nbb\n", b"", b"ccc\r\nd\ne", b"f\n"]):
        path = root / f"{i}.txt"
        path.write_bytes(data)
        names.append(str(path))
    return names


def _gzipped(root: Path) -> list[str]:
    names = []
    for i, data in enumerate([b"a\nbb\n", b"ccc\nd\ne"]):
        path = root / f"{i}.txt.gz"
        path.write_bytes(gzip.compress(data))
        names.append(str(path))
    return names


# Finite pipelines (a count enlarged in a state is then replayed to an end, not forever),
# built from the ops whose states they cover; ``files`` is a folder for the text files.
PIPELINES: dict[str, Callable[[Path], fl.Dataset]] = {
    "range": lambda files: D.range(10),
    "range_down": lambda files: D.range(40, 3, -4),
    "slices": lambda files: D.from_tensor_slices(
        {"a": np.arange(6), "b": np.arange(12.0).reshape(6, 2), "c": [b"u", b"v"] * 3}
    ),
    "tensors_repeat": lambda files: D.from_tensors((np.int32(1), b"x")).repeat(3),
    "generator_batch": lambda files: D.from_generator(_numbers, output_signature=I64).batch(2),
    "repeat_skip_take": lambda files: D.range(15).repeat(3).skip(4).take(30),
    "shard_enumerate": lambda files: D.range(25).shard(3, 1).enumerate(5),
    "filter_batch": lambda files: D.range(40).filter(lambda x: x % 3 != 0).batch(4),
    "padded_batch": lambda files: D.range(12).map(_long_short).padded_batch(3),
    "unbatch": lambda files: D.range(23).batch(5).unbatch(),
    "rebatch": lambda files: D.range(23).batch(4).rebatch([3, 2]),
    "shuffle_batch": lambda files: D.range(30).shuffle(8, seed=1).batch(3),
    "shuffle_repeat": lambda files: D.range(12).shuffle(5, seed=9).repeat(2),
    "filter_shuffle": lambda files: D.range(30).filter(lambda x: x % 4 != 1).shuffle(6, seed=2),
    "window": lambda files: D.range(14).window(4, 3),
    "window_gaps": lambda files: D.range(14).window(2, 5),
    "scan": lambda files: D.range(20).scan(
        (np.int64(0), b""), lambda s, x: ((s[0] + x, s[1] + b"."), s[0])
    ),
    "counter": lambda files: D.counter(5, 3).take(15),
    "group_by_window": lambda files: D.range(20).group_by_window(
        lambda x: x % 3, lambda k, w: w.batch(2), window_size=4
    ),
    "bucket": lambda files: (
        D.range(20).map(_long_short).bucket_by_sequence_length(_length, [2, 3], [3, 2, 2])
    ),
    "unique": lambda files: D.range(40).map(lambda x: x % 7).unique(),
    "sample": lambda files: D.sample_from_datasets(
        [D.range(8), D.range(100, 105)], weights=[0.3, 0.7], seed=3
    ),
    "sample_weights": lambda files: D.sample_from_datasets(
        [D.range(6), D.range(50, 56)],
        weights=D.from_tensors(np.array([0.4, 0.6], np.float32)).repeat(10),
        seed=5,
    ),
    "choose": lambda files: D.choose_from_datasets(
        [D.range(5), D.range(10, 15)], D.range(12).map(lambda x: x % 2)
    ),
    "random": lambda files: D.random(seed=4).take(12),
    "take_while": lambda files: D.range(30).take_while(lambda x: x < 17),
    "random_map": lambda files: D.range(15).random_map(
        lambda x, rng: x + rng.integers(100), seed=2
    ),
    "map_parallel": lambda files: D.range(30).map(lambda x: x * 2, num_parallel_calls=2).batch(4),
    "prefetch": lambda files: D.range(20).prefetch(2),
    "text": lambda files: fl.TextLineDataset(_texts(files)),
    "text_gzip": lambda files: fl.TextLineDataset(_gzipped(files), compression_type="GZIP"),
}


@dataclass
class Pass:
    """One uninterrupted pass and the state (JSON round-tripped) after each element."""

    dataset: fl.Dataset
    elements: list[Any]
    states: list[dict[str, Any]]  # states[k]: after k elements


def comparable(element: Any) -> Any:
    """``element`` with each dataset in it (a window's) replaced by a tuple of its elements."""
    if isinstance(element, D):
        return tuple(comparable(x) for x in element)
    if isinstance(element, tuple):
        return tuple(comparable(x) for x in element)
    if isinstance(element, dict):
        return {k: comparable(v) for k, v in element.items()}
    return element


def record_pass(dataset: fl.Dataset) -> Pass:
    elements, states = [], []
    with dataset.iterator() as it:
        while True:
            states.append(json.loads(json.dumps(it.get_state())))
            try:
                elements.append(comparable(next(it)))
            except StopIteration:
                break
    return Pass(dataset, elements, states)


@pytest.fixture(scope="module")
def passes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pass]:
    files = tmp_path_factory.mktemp("texts")
    return {name: record_pass(make(files)) for name, make in PIPELINES.items()}


# -- resuming ---------------------------------------------------------------------------------


class Rejected(Exception):
    """The state was refused with ``InvalidStateError`` before any element."""


def resume(dataset: fl.Dataset, state: Any, limit: int, via_set_state: bool) -> list[Any]:
    """Up to ``limit`` elements resumed from ``state``; ``Rejected`` if it was refused before
    the first element. Any other exception, or a refusal later on, propagates."""
    produced: list[Any] = []
    try:
        if via_set_state:
            it = dataset.iterator()
            it.set_state(state)
        else:
            it = dataset.iterator(state)
        with it:
            for element in it:
                produced.append(comparable(element))
                if len(produced) >= limit:
                    break
    except InvalidStateError as e:
        if produced:
            raise AssertionError(f"refused after {len(produced)} elements: {e}") from e
        raise Rejected(str(e)) from e
    return produced


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_real_states_resume_exactly(name: str, passes: dict[str, Pass]) -> None:
    run = passes[name]
    for cut, state in enumerate(run.states):
        via_set_state = cut % 2 == 1
        rest = resume(run.dataset, state, len(run.elements) + 1, via_set_state)
        try:
            assert_elements_equal(run.elements[:cut] + rest, run.elements)
        except AssertionError as e:
            raise AssertionError(f"resumed after {cut} elements: {e}") from e
    record("states", pipelines=1, states=len(run.states))


# -- mutations --------------------------------------------------------------------------------


def nodes(tree: Any, path: NodePath = ()) -> Iterator[tuple[NodePath, Any]]:
    """Every node of a JSON tree with its path, the root first."""
    yield path, tree
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from nodes(value, (*path, key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from nodes(value, (*path, i))


def replaced(tree: Any, path: NodePath, value: Any) -> Any:
    """A copy of ``tree`` with ``value`` at ``path``."""
    if not path:
        return value
    out = copy.deepcopy(tree)
    _parent(out, path)[path[-1]] = value
    return out


def removed(tree: Any, path: NodePath) -> Any:
    """A copy of ``tree`` without the node at ``path``."""
    out = copy.deepcopy(tree)
    del _parent(out, path)[path[-1]]
    return out


def _parent(tree: Any, path: NodePath) -> Any:
    for key in path[:-1]:
        tree = tree[key]
    return tree


def wrong_types(value: Any) -> list[Any]:
    """Values of a type no state could hold where ``value`` is."""
    if isinstance(value, bool):
        return [int(value), str(value).lower(), None]
    if isinstance(value, int):
        return [str(value), value + 0.5, [value], True]
    if isinstance(value, str):
        return [7, [value], None]
    if isinstance(value, list):
        return [dict(enumerate(value)), "list", 0]
    if isinstance(value, dict):
        return [list(value.values()), "dict", 1]
    return [0, "none", []]  # None stands for a done input's state: a dict or None only


@dataclass
class Mutation:
    kind: str
    path: NodePath
    state: Any
    must_reject: bool  # no pipeline could have written it


def mutations(state: dict[str, Any], other: dict[str, Any]) -> list[Callable[[Any], Mutation]]:
    """Makers of mutations of ``state``, each drawing its details with a hypothesis draw."""
    tree = list(nodes(state))
    makers: list[Callable[[Any], Mutation]] = []

    def pick(draw: Any, fits: Callable[[NodePath, Any], bool]) -> tuple[NodePath, Any]:
        chosen: tuple[NodePath, Any] = draw(st.sampled_from([n for n in tree if fits(*n)]))
        return chosen

    def is_int(path: NodePath, v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def drop_key(draw: Any) -> Mutation:
        path, node = pick(draw, lambda p, v: isinstance(v, dict) and bool(v))
        key = draw(st.sampled_from(sorted(node)))
        return Mutation("drop_key", (*path, key), removed(state, (*path, key)), True)

    def retype(draw: Any) -> Mutation:
        path, value = pick(draw, lambda p, v: True)
        new = draw(st.sampled_from(wrong_types(value)))
        return Mutation("retype", path, replaced(state, path, new), True)

    def move_int(draw: Any) -> Mutation:
        path, value = pick(draw, is_int)
        new = draw(
            st.sampled_from([-value, value + 1, value - 1, 2 * value + 3, value + 1000, 2**62])
        )
        return Mutation("move_int", path, replaced(state, path, new), False)

    def flip(draw: Any) -> Mutation:
        path, value = pick(draw, lambda p, v: isinstance(v, bool))
        return Mutation("flip", path, replaced(state, path, not value), False)

    def truncate(draw: Any) -> Mutation:
        path, value = pick(draw, lambda p, v: isinstance(v, list) and bool(v))
        keep = draw(st.integers(0, len(value) - 1))
        return Mutation("truncate", path, replaced(state, path, value[:keep]), False)

    def bad_text(draw: Any) -> Mutation:
        # States hold text only as op names, dtypes and base64 data: none survives this.
        path, value = pick(draw, lambda p, v: isinstance(v, str))
        return Mutation("bad_text", path, replaced(state, path, value + "!"), True)

    def graft(draw: Any) -> Mutation:
        path, _ = pick(draw, lambda p, v: isinstance(v, dict) and len(p) >= 1)
        donors = [v for _, v in nodes(other) if isinstance(v, dict)]
        donor = draw(st.sampled_from(donors))
        return Mutation("graft", path, replaced(state, path, copy.deepcopy(donor)), False)

    makers += [drop_key, retype, move_int, truncate, bad_text, graft]
    if any(isinstance(v, bool) for _, v in tree):
        makers.append(flip)
    return makers


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_mutated_states_are_rejected_or_resume(name: str, passes: dict[str, Pass]) -> None:
    run = passes[name]
    others = [p.states[len(p.states) // 2] for n, p in sorted(passes.items()) if n != name]
    # A mutated position may resume earlier than the cut: bounded, but never far past a pass.
    limit = 2 * len(run.elements) + 20
    counts = {"mutations": 0, "rejected": 0}

    @settings(max_examples=MUTATIONS, derandomize=True, deadline=None, database=None)
    @given(st.data())
    def check(data: Any) -> None:
        cut = data.draw(st.integers(0, len(run.states) - 1), label="cut")
        other = data.draw(st.sampled_from(others), label="other")
        make = data.draw(st.sampled_from(mutations(run.states[cut], other)), label="kind")
        mutation = make(data.draw)
        via_set_state = data.draw(st.booleans(), label="via_set_state")
        where = f"{mutation.kind} at {list(mutation.path)} after {cut} elements"
        try:
            resume(run.dataset, mutation.state, limit, via_set_state)
        except Rejected:
            counts["rejected"] += 1
        except Exception as e:
            raise AssertionError(f"{where}: {type(e).__name__}: {e}") from e
        else:
            assert not mutation.must_reject, f"{where}: resumed from {mutation.state}"
        counts["mutations"] += 1

    check()
    record("states", mutations=counts["mutations"], rejected=counts["rejected"])


# -- the envelope: version, pipeline, root ----------------------------------------------------


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda s: s.update(version=2), "version"),
        (lambda s: s.update(version=True), "version"),
        (lambda s: s.pop("version"), "version"),
        (lambda s: s.update(pipeline=["range(0, 9, 1)"]), "pipeline"),
        (lambda s: s.update(pipeline="range(0, 10, 1)"), "pipeline"),
        (lambda s: s.pop("pipeline"), "pipeline"),
        (lambda s: s.pop("root"), "root"),
        # None would have started a fresh pass: silently the wrong elements.
        (lambda s: s.update(root=None), "root"),
        (lambda s: s.update(root=[]), "root"),
    ],
)
def test_state_envelope_is_checked(edit: Callable[[dict[str, Any]], None], field: str) -> None:
    ds = D.range(10)
    state = saved_state(ds, 4)
    edit(state)
    assert_state_rejected(ds, state, field)


@pytest.mark.parametrize(
    "state, field", [([], "<state>"), ("state", "<state>"), (3, "<state>"), ({}, "version")]
)
def test_a_state_that_is_not_one_is_rejected(state: Any, field: str) -> None:
    assert_state_rejected(D.range(10), state, field)
