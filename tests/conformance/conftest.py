"""The conformance suite compares feedline with TensorFlow's tf.data and skips itself where
TensorFlow is not installed. CI sets ``FEEDLINE_CONFORMANCE=required`` (``make test`` and
``make conformance``): then a TensorFlow that cannot be imported fails the run instead of
skipping the over 600 checks the README's claim rests on."""

from __future__ import annotations

import os

import pytest

REQUIRED = os.environ.get("FEEDLINE_CONFORMANCE") == "required"


def pytest_configure(config: pytest.Config) -> None:
    if not REQUIRED:
        return
    try:
        import tensorflow  # noqa: F401
    except ImportError as e:
        raise pytest.UsageError(
            f"FEEDLINE_CONFORMANCE=required, but TensorFlow cannot be imported ({e}): "
            "install the test extra (pip install -e '.[test]')"
        ) from e
