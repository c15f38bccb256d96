"""How worker processes start, and what they are given to run.

Workers start from a forkserver on Linux (never ``fork`` from the multi-threaded parent), with
spawn elsewhere, and without running the user's main script again. What a worker runs (its
*service*: the user function and what to do with each request) goes to each worker once,
pickled with cloudpickle so lambdas and closures work.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import multiprocessing
import pickle
import sys
import threading
import types
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from feedline.errors import StageError

if TYPE_CHECKING:
    pass


logger = logging.getLogger("feedline")


def require_cloudpickle() -> ModuleType:
    """cloudpickle, or an ImportError saying how to get it."""
    try:
        import cloudpickle
    except ImportError as e:
        raise ImportError(
            "executor='process' needs cloudpickle, a dependency of feedline: reinstall feedline"
        ) from e
    return cloudpickle


@functools.cache
def _context() -> Any:
    """The multiprocessing context workers start from (one forkserver per parent process).

    The forkserver preloads feedline, so each worker forks with it (and numpy) already
    imported: ~15 ms per worker instead of ~300 ms importing it afresh. It does not preload
    ``__main__``: see ``_main_not_reimported``.
    """
    if not sys.platform.startswith("linux"):
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


_forkserver_lock = threading.Lock()
_forkserver_starting: threading.Thread | None = None


def start_forkserver_soon() -> None:
    """Start the process workers fork from, on a thread, if it is not started yet.

    Starting it is a new interpreter importing feedline and numpy: ~0.5 s on a busy 2-core
    machine, which the first worker would otherwise wait for (a GIL-bound tokenizer ran on
    threads at half its rate that long, after the tuner chose processes)."""
    global _forkserver_starting
    if _context().get_start_method() != "forkserver":
        return
    with _forkserver_lock:
        if _forkserver_starting is not None:
            return
        _forkserver_starting = threading.Thread(
            target=_start_forkserver, name="feedline-forkserver-start", daemon=True
        )
        _forkserver_starting.start()


def forkserver_pid() -> int | None:
    """The process workers fork from, once started (its start takes a core for a while)."""
    if _forkserver_starting is None:
        return None
    from multiprocessing import forkserver

    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    return pid if isinstance(pid, int) else None


def _start_forkserver() -> None:
    from multiprocessing import forkserver

    try:
        with _main_not_reimported():
            forkserver.ensure_running()
    except Exception:  # the first worker's start tries again and says why
        logger.debug("starting the forkserver ahead of workers failed", exc_info=True)


_main_hidden_lock = threading.Lock()


@contextlib.contextmanager
def _main_not_reimported() -> Iterator[None]:
    """Start workers without running the user's main script again in them.

    multiprocessing re-imports ``__main__`` in a new worker (by path or module name), which
    re-runs a script that lacks an ``if __name__ == "__main__":`` guard — its whole training
    loop, in every worker. Workers need nothing from it (cloudpickle sends functions defined
    there by value), so while a worker starts, ``__main__`` shows neither its file nor its
    module spec.
    """
    # One start at a time: two overlapping ones (the forkserver's and a worker's, on two
    # threads) would have the later one restore the names the earlier one hid, as None.
    with _main_hidden_lock:
        main = sys.modules.get("__main__")
        names = ("__file__", "__spec__")
        hidden = {name: getattr(main, name) for name in names if hasattr(main, name)}
        try:
            for name in hidden:
                setattr(main, name, None)
            yield
        finally:
            for name, value in hidden.items():
                setattr(main, name, value)


class Service(Protocol):
    """What a worker runs: called with each request, it returns the reply."""

    def __call__(self, request: Any) -> Any: ...

    def unsendable(self, reply: Any, error: Exception) -> Any:
        """A reply to send instead of ``reply``, which could not be pickled (``error``): what
        of it can be sent, with per-element errors for what cannot."""
        ...


def cloudpickle_dumps(
    obj: Any, buffer_callback: Callable[[pickle.PickleBuffer], bool] | None = None
) -> bytes:
    """``obj`` pickled by cloudpickle, with the file names of the code it sends by value.

    cloudpickle >= 3.1 names such code ``<dynamic-code>``: a worker's traceback would then show
    neither the file nor the failing line of the user's lambda. Each code object is sent as
    cloudpickle sends it, and renamed back when loaded."""
    cloudpickle = require_cloudpickle()
    # Copies of the code objects being sent, left to cloudpickle. A copy rather than the code
    # itself: pickle would take an object saved while saving its own arguments for recursion,
    # and drop the renaming around it.
    copies: dict[int, types.CodeType] = {}

    class KeepingFileNames(cloudpickle.Pickler):  # type: ignore[misc, name-defined]
        def reducer_override(self, o: Any) -> Any:
            if type(o) is types.CodeType and id(o) not in copies:
                copy = o.replace()
                copies[id(copy)] = copy  # kept alive: its id must not be reused meanwhile
                return _named_code, (copy, o.co_filename)
            return super().reducer_override(o)

    buffer = io.BytesIO()
    KeepingFileNames(buffer, protocol=5, buffer_callback=buffer_callback).dump(obj)
    return buffer.getvalue()


def _named_code(code: types.CodeType, filename: str) -> types.CodeType:
    return code if code.co_filename == filename else code.replace(co_filename=filename)


def pickled_service(service: Service, name: str) -> bytes:
    """``service`` as workers load it; a ``StageError`` naming stage ``name`` if it cannot be
    pickled."""
    try:
        blob = cloudpickle_dumps(service)
    except Exception as e:
        raise StageError(
            name,
            None,
            f"executor='process' cannot send the function to worker processes "
            f"({type(e).__name__}: {e}); make it picklable or use executor='thread'",
        ) from e
    return blob
