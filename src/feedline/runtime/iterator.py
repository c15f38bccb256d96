"""The contract every op's iterator follows, and the cursor that makes chunked reads resumable.

A stage iterator is a Python iterator (``__next__`` raises ``StopIteration`` at the end) with:

- ``next_chunk(n)``: up to ``n`` next elements as a list, ``[]`` only at the end. Passing lists
  between stages amortises Python's per-call cost; it never changes which elements come out.
- ``get_state()``: a small dict (JSON-able where the op allows) from which the op's
  ``make_iterator(ctx, state)`` resumes exactly after the last element this iterator returned.
- ``close()``: releases resources (threads, files) of this iterator and its inputs; idempotent.
"""

from __future__ import annotations

from typing import Any

from feedline.errors import InvalidStateError
from feedline.runtime.states import State, state_int, state_nested


class StageIterator:
    """Base class: subclasses implement ``__next__`` and ``get_state``, and override
    ``next_chunk`` where they can produce a list faster than one call per element."""

    inputs: tuple[StageIterator, ...] = ()
    # An error met while filling a chunk, raised on the next call once the elements before it
    # have been delivered (raising at once would drop them).
    _deferred_error: BaseException | None = None

    def __iter__(self) -> StageIterator:
        return self

    def __next__(self) -> Any:
        raise NotImplementedError

    def next_chunk(self, max_n: int) -> list[Any]:
        error = self._deferred_error
        if error is not None:
            self._deferred_error = None
            raise error
        out = []
        try:
            for _ in range(max_n):
                out.append(self.__next__())
        except StopIteration:
            pass
        except Exception as e:
            if not out:
                raise
            self._deferred_error = e
        return out

    def next_block(self, n: int) -> Any | None:
        """The next ``n`` elements as one array already stacked (a batch of them), when this
        iterator made them so and nothing else can see them; None otherwise: the caller then
        takes elements. Asking also tells the iterator that blocks of ``n`` are wanted."""
        return None

    def ready_list(self) -> list[Any] | None:
        """The next elements this iterator already holds, made and checked, last first, in
        a list the consumer may ``pop()`` from instead of calling ``next`` (``get_state``
        counts what is still in it), until it is empty; the iterator then makes a new one
        on its next call. None when it holds none so: the consumer calls ``next``."""
        return None

    def get_state(self) -> State:
        raise NotImplementedError

    def close(self) -> None:
        for it in self.inputs:
            it.close()


class ChunkedIterator(StageIterator):
    """For iterators that produce in chunks: one element is a chunk of one."""

    def __next__(self) -> Any:
        chunk = self.next_chunk(1)
        if not chunk:
            raise StopIteration
        return chunk[0]


class EmptyIterator(StageIterator):
    def __next__(self) -> Any:
        raise StopIteration

    def next_chunk(self, max_n: int) -> list[Any]:
        return []

    def get_state(self) -> State:
        return {}


# The most elements skipping holds at once: a count read from a state may be huge.
_SKIP_CHUNK = 4096


def skip_elements(it: StageIterator, count: int) -> int:
    """Pull and drop ``count`` elements; returns how many were actually there."""
    skipped = 0
    while skipped < count:
        chunk = it.next_chunk(min(count - skipped, _SKIP_CHUNK))
        if not chunk:
            break
        skipped += len(chunk)
    return skipped


class InputCursor:
    """Reads an input iterator in chunks while remembering where each chunk began.

    Its owner consumes the current chunk front to back (``peek``/``advance``); ``get_state`` is
    then *(input state before this chunk, elements of it consumed)*, and restoring replays just
    that prefix, so a stage can read ahead by a chunk yet save its position to the element.
    """

    __slots__ = ("_chunk", "_chunk_start_state", "_exhausted", "_index", "input")

    def __init__(self, input_iterator: StageIterator) -> None:
        self.input = input_iterator
        self._chunk: list[Any] = []
        self._index = 0
        self._chunk_start_state: State | None = None
        self._exhausted = False

    @classmethod
    def restore(cls, make_input: Any, state: State | None, owner: str) -> InputCursor:
        """A cursor over ``make_input(input_state)``, positioned as ``state`` (or at the start).

        The state's chunk had at least ``consumed`` elements: an input that ends before them
        means the state is not this pipeline's (``owner`` is named in the error).
        """
        if state is None:
            return cls(make_input(None))
        consumed = state_int(state, "consumed", owner)
        cursor = cls(make_input(state_nested(state, "input", owner)))
        try:
            if skip_elements(cursor.input, consumed) < consumed:
                raise InvalidStateError(
                    owner, "consumed", f"is {consumed}: the input ends before that"
                )
        except BaseException:
            cursor.close()
            raise
        return cursor

    def peek(self, max_n: int) -> list[Any]:
        """Up to ``max_n`` unconsumed elements (at least one unless the input is done)."""
        if self._index >= len(self._chunk):
            if self._exhausted:
                return []
            self._chunk_start_state = self.input.get_state()
            self._chunk = self.input.next_chunk(max_n)
            self._index = 0
            if not self._chunk:
                self._exhausted = True
                return []
        if self._index == 0 and len(self._chunk) <= max_n:
            return self._chunk
        return self._chunk[self._index : self._index + max_n]

    def advance(self, n: int) -> None:
        self._index += n

    def take(self, max_n: int) -> list[Any]:
        chunk = self.peek(max_n)
        self._index += len(chunk)
        return chunk

    def next(self) -> Any:
        if self._index >= len(self._chunk) and not self.peek(1):
            raise StopIteration
        x = self._chunk[self._index]
        self._index += 1
        return x

    def get_state(self) -> State:
        if self._index >= len(self._chunk) or self._exhausted:
            return {"input": self.input.get_state(), "consumed": 0}
        if self._chunk_start_state is None:
            raise RuntimeError("cursor lost the state of its chunk")  # pragma: no cover
        return {"input": self._chunk_start_state, "consumed": self._index}

    def close(self) -> None:
        self.input.close()
