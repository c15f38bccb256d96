"""What the framework adapters share: a pass's elements, converted for a framework (tensors on a
device), some of them ahead of the consumer, with a state that resumes exactly.

``feedline.torch.to_torch`` and ``feedline.jax.device_put`` are a ``Feed`` each: the first
with a conversion to torch tensors, the second to ``jax.Array``\\ s. Sending an element to a
device is asynchronous in both frameworks (``non_blocking`` copies, JAX's dispatch), so
converting the next elements before handing out the current one overlaps their copies with
the training step, without a thread.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from feedline.dataset import Dataset
from feedline.pipeline import DatasetIterator
from feedline.runtime.iterator import State

# The key of ``state_dict()``: the pass's state as one JSON string, a single leaf that
# torch.distributed.checkpoint (and orbax) store and load in place whatever the pipeline.
STATE_KEY = "feedline_state"
# The most elements an adaptive feed keeps ahead: each holds a batch in device memory.
MAX_AHEAD = 8


class Feed:
    """An iterator of ``convert(element)`` for the elements of ``iterable`` (a Dataset, its
    iterator, or any iterable), ``ahead`` of them converted before they are asked for.

    ``ready(converted)`` (optional) tells whether an element's copy has finished when it is
    handed out; one that has not means the consumer will wait on it, and ``ahead`` grows by
    one, up to ``MAX_AHEAD`` (AUTOTUNE's depth for a device queue).

    ``state_dict()`` / ``load_state_dict()`` save and resume the pass (over a Dataset or its
    iterator) after the last element handed out, whatever was converted ahead: the protocol
    of torch.distributed.checkpoint's ``Stateful``.
    """

    def __init__(
        self,
        iterable: Iterable[Any],
        convert: Callable[[Any], Any],
        ahead: int = 0,
        ready: Callable[[Any], bool] | None = None,
    ) -> None:
        self._owned = isinstance(iterable, Dataset)
        self._it: Iterator[Any] = (
            iterable.iterator() if isinstance(iterable, Dataset) else iter(iterable)
        )
        self._convert = convert
        self.ahead = ahead
        self._ready = ready
        # Converted, not handed out yet: (element, the pass's state before it).
        self._queue: deque[tuple[Any, State | None]] = deque()
        self._ended = False
        # An error met while converting ahead, raised once the elements before it are out.
        self._error: Exception | None = None

    def __iter__(self) -> Feed:
        return self

    def __next__(self) -> Any:
        if not self.ahead:
            return self._convert(next(self._it))
        if not self._queue:
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            self._fill()
            if not self._queue:
                raise StopIteration
        element, _ = self._queue.popleft()
        # Start converting (copying) the next ones before the consumer works on this one.
        try:
            self._fill()
        except Exception as e:  # a failed element (a StageError): the pass goes on after it
            self._error = e
        if self._ready is not None and self.ahead < MAX_AHEAD and not self._ready(element):
            self.ahead += 1
        return element

    def _fill(self) -> None:
        # Not past an error: the elements after it go out after it.
        while not self._ended and self._error is None and len(self._queue) < self.ahead:
            state = self._it.get_state() if isinstance(self._it, DatasetIterator) else None
            try:
                element = next(self._it)
            except StopIteration:
                self._ended = True
                return
            self._queue.append((self._convert(element), state))

    def _pass(self) -> DatasetIterator:
        if not isinstance(self._it, DatasetIterator):
            raise TypeError(
                "only a pass over a feedline Dataset can be saved and restored "
                f"(this feed reads a {type(self._it).__name__})"
            )
        return self._it

    def state_dict(self) -> dict[str, Any]:
        """Where the pass is: after the last element handed out."""
        now = self._pass()
        state = self._queue[0][1] if self._queue else now.get_state()
        return {STATE_KEY: json.dumps(state)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume at a ``state_dict()``; one this pipeline could not have written is an
        ``InvalidStateError`` and leaves the pass where it was."""
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get(STATE_KEY), str):
            raise ValueError(f"not a feedline state_dict: it needs the string {STATE_KEY!r}")
        self._pass().set_state(json.loads(state_dict[STATE_KEY]))
        self._queue.clear()
        self._ended = False
        self._error = None

    def close(self) -> None:
        """Stop the pass (its threads and processes) if this feed started it."""
        self._queue.clear()
        if self._owned:
            self._pass().close()

    def __enter__(self) -> Feed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
