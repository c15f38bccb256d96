"""Test helpers shared by every op's tests."""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

import feedline as fl
from feedline.errors import InvalidStateError


def assert_element_equal(a: Any, b: Any, where: str = "element") -> None:
    """Same nesting, same leaf types/dtypes, same values (NaN equal to NaN)."""
    if isinstance(a, tuple | dict) or isinstance(b, tuple | dict):
        assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
        if isinstance(a, dict):
            assert sorted(a) == sorted(b), f"{where}: keys {sorted(a)} vs {sorted(b)}"
            for k in a:
                assert_element_equal(a[k], b[k], f"{where}[{k!r}]")
        else:
            assert len(a) == len(b), f"{where}: {len(a)} vs {len(b)} parts"
            for i, (x, y) in enumerate(zip(a, b)):
                assert_element_equal(x, y, f"{where}[{i}]")
        return
    if isinstance(a, bytes) or isinstance(b, bytes):
        assert a == b, f"{where}: {a!r} vs {b!r}"
        return
    xa, xb = np.asarray(a), np.asarray(b)
    assert xa.dtype == xb.dtype, f"{where}: dtype {xa.dtype} vs {xb.dtype}"
    assert xa.shape == xb.shape, f"{where}: shape {xa.shape} vs {xb.shape}"
    if xa.dtype == object:
        assert xa.tolist() == xb.tolist(), f"{where}: {a!r} vs {b!r}"
    else:
        np.testing.assert_array_equal(xa, xb, err_msg=where)


def assert_elements_equal(got: Sequence[Any], want: Sequence[Any]) -> None:
    assert len(got) == len(want), f"{len(got)} elements, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert_element_equal(g, w, f"element {i}")


def take(it: Iterable[Any], n: int) -> list[Any]:
    if n <= 0:
        return []
    out = []
    for x in it:
        out.append(x)
        if len(out) == n:
            break
    return out


def assert_state_roundtrip(
    dataset: fl.Dataset,
    cut_points: Iterable[int] = (0, 1, 2, 3, 7),
    json_able: bool = True,
    limit: int = 2000,
) -> None:
    """Saving an iterator's state after ``cut`` elements and resuming a new iterator from it
    yields exactly what the original iterator goes on to yield, for every cut point (plus the
    middle and the end of the pass). The state must survive pickle (and JSON if ``json_able``).

    Compares against the *same* iterator's continuation, not a fresh pass, so datasets whose
    passes differ (shuffle with reshuffle_each_iteration) are checked too. Infinite datasets
    are compared over their first ``limit`` elements.
    """
    with dataset.iterator() as probe:
        total = len(take(probe, limit + 1))
    cuts = sorted({c for c in cut_points if c <= total} | {total // 2, total})
    for cut in cuts:
        with dataset.iterator() as it:
            take(it, cut)
            state = it.get_state()
            rest = take(it, limit)
        restored_state = pickle.loads(pickle.dumps(state))
        if json_able:
            restored_state = json.loads(json.dumps(state))
        with dataset.iterator(restored_state) as resumed:
            again = take(resumed, limit)
        try:
            assert_elements_equal(again, rest)
        except AssertionError as e:
            raise AssertionError(f"after restoring at element {cut}: {e}") from e
        # set_state on a live iterator must behave the same as a new one.
        with dataset.iterator() as other:
            take(other, 1)
            other.set_state(restored_state)
            assert_elements_equal(take(other, limit), rest)


def saved_state(dataset: fl.Dataset, cut: int = 0) -> dict[str, Any]:
    """The state of a pass over ``dataset`` after ``cut`` elements, as JSON gives it back."""
    with dataset.iterator() as it:
        take(it, cut)
        state: dict[str, Any] = json.loads(json.dumps(it.get_state()))
    return state


def assert_root_field_rejected(dataset: fl.Dataset, cut: int, field: str, value: Any) -> None:
    """A state taken after ``cut`` elements is refused, naming ``field``, with that field of
    its root set to ``value`` and with it missing."""
    state = saved_state(dataset, cut)
    state["root"][field] = value
    assert_state_rejected(dataset, state, field)
    del state["root"][field]
    assert_state_rejected(dataset, state, field)


def assert_state_rejected(dataset: fl.Dataset, state: Any, field: str) -> None:
    """Resuming ``dataset`` from ``state`` raises ``InvalidStateError`` naming ``field``
    before any element is produced, both for a new iterator and through ``set_state``."""
    for resume in ("iterator", "set_state"):
        try:
            if resume == "iterator":
                it = dataset.iterator(state)
            else:
                it = dataset.iterator()
                it.set_state(state)
            with it:
                got = take(it, 1)
        except InvalidStateError as e:
            assert e.field == field, f"{resume}: {e}"
            continue
        raise AssertionError(f"{resume}: resumed from a crafted state, yielding {got}")
