"""User functions the Ray tests distribute. Kept apart from the test modules: an actor
imports the module a function comes from, and this one needs only numpy (not pytest)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np


def square(x: Any) -> Any:
    return np.full((3,), x * x, dtype=np.int64)


def noisy(x: Any, rng: np.random.Generator) -> Any:
    return x + rng.integers(0, 1000, size=3)


def slow(x: Any) -> Any:
    time.sleep(0.002)
    return x


def fails_at_7_and_30(x: Any) -> Any:
    if x == 7 or x == 30:
        raise ValueError(f"no {x}")
    return x


def not_multiple_of_3(x: Any) -> Any:
    return x % 3 != 0


def times_10(x: Any) -> Any:
    return x * 10


def wait_10ms(x: Any) -> Any:
    time.sleep(0.01)
    return x
