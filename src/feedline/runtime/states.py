"""Reading iterator states as the untrusted input they are.

A state comes from a user's checkpoint: it may be damaged, edited, or saved from another
pipeline that happens to have the same op names. Each op reads its fields through these
helpers, so a bad state is an ``InvalidStateError`` naming the op and the field before any
element is produced, never a bare ``IndexError`` or a silently wrong pass.
"""

from __future__ import annotations

from typing import Any

from feedline.errors import InvalidStateError

# A stage's saved position: JSON-able nesting of dicts, lists, numbers and strings.
State = dict[str, Any]

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def state_dict(state: Any, owner: str, *fields: str) -> State:
    """``state`` as a dict holding ``fields``."""
    if not isinstance(state, dict):
        raise InvalidStateError(owner, "<state>", f"is a {type(state).__name__}, not a dict")
    for field in fields:
        if field not in state:
            raise InvalidStateError(owner, field, "is missing")
    return state


def state_int(
    state: State, field: str, owner: str, minimum: int = 0, maximum: int | None = None
) -> int:
    """An integer field within [minimum, maximum] (``bool`` is not an integer here)."""
    return check_int(state_dict(state, owner, field)[field], field, owner, minimum, maximum)


def check_int(
    value: Any, field: str, owner: str, minimum: int = 0, maximum: int | None = None
) -> int:
    """``value`` (read from ``field``) as an integer within [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidStateError(owner, field, f"is {value!r}, not an integer")
    if value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f", at most {maximum}"
        raise InvalidStateError(owner, field, f"is {value}: must be at least {minimum}{upper}")
    return value


def state_bool(state: State, field: str, owner: str) -> bool:
    """A ``True``/``False`` field (not 0/1: an op writes real booleans)."""
    value = state_dict(state, owner, field)[field]
    if not isinstance(value, bool):
        raise InvalidStateError(owner, field, f"is {value!r}, not a boolean")
    return value


def state_nested(state: State, field: str, owner: str) -> State:
    """The state of an input or sub-iterator: a dict, which that iterator then checks.

    Never None: an input given None starts afresh, which would be a silently wrong pass.
    """
    return check_nested(state_dict(state, owner, field)[field], field, owner)


def check_nested(value: Any, field: str, owner: str) -> State:
    """``value`` (read from ``field``) as an iterator state: a dict."""
    if not isinstance(value, dict):
        raise InvalidStateError(owner, field, f"is {_short(value)}, not an iterator state")
    return value


def state_optional_nested(state: State, field: str, owner: str) -> State | None:
    """Like :func:`state_nested`, where the op writes None (e.g. for an input it finished)."""
    if state_dict(state, owner, field)[field] is None:
        return None
    return state_nested(state, field, owner)


def state_list(
    state: State, field: str, owner: str, length: int | None = None, max_length: int | None = None
) -> list[Any]:
    """A list field, of exactly ``length`` items or at most ``max_length`` when given."""
    value = state_dict(state, owner, field)[field]
    if not isinstance(value, list):
        raise InvalidStateError(owner, field, f"is {_short(value)}, not a list")
    if length is not None and len(value) != length:
        raise InvalidStateError(owner, field, f"has {len(value)} items, not {length}")
    if max_length is not None and len(value) > max_length:
        raise InvalidStateError(owner, field, f"has {len(value)} items, more than {max_length}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"a {type(value).__name__}"


def state_ranges(state: State, field: str, owner: str) -> list[list[int]]:
    """A list of ``[start, end)`` pairs of non-negative integers, each with start <= end."""
    value = state_dict(state, owner, field)[field]
    if not isinstance(value, list):
        raise InvalidStateError(owner, field, f"is {value!r}, not a list of [start, end] pairs")
    ranges = []
    for pair in value:
        if (
            not isinstance(pair, (list, tuple))
            or len(pair) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
            or not 0 <= pair[0] <= pair[1]
        ):
            raise InvalidStateError(owner, field, f"holds {pair!r}, not a [start, end] pair")
        ranges.append([pair[0], pair[1]])
    return ranges


def frozen(state: Any) -> Any:
    """A copy of ``state`` in plain dicts and lists, as a user keeps it: states that stages
    hold go on changing (a ``Journal`` records what is delivered after it was taken)."""
    if isinstance(state, LiveState):
        state = state.current()
    if isinstance(state, dict):
        return {key: frozen(value) for key, value in state.items()}
    if isinstance(state, list):
        return [frozen(value) for value in state]
    return state


def known_end(cardinality: int) -> int | None:
    """The most elements a count read from a state may be, where the op's cardinality (its
    number of elements, or a negative code for infinite or unknown) sets one."""
    return cardinality if cardinality >= 0 else None


class LiveState(dict[str, Any]):
    """A state an iterator gave out whose full content is known only when the user takes
    it: ``frozen`` reads ``current()`` then. Until then it may be held inside other states
    (a reader's record of where its input was), as any state is."""

    __slots__ = ("__weakref__",)

    def current(self) -> State:
        raise NotImplementedError
