"""Random pipelines against real tf.data: elements (values, dtypes, nesting), cardinality and
element_spec, with the checks of ``test_vs_tfdata``. The seeds are fixed, so a failure names
a pipeline to rerun; ``random_pipelines.pipeline_code(seed)`` prints it."""

from __future__ import annotations

import pytest

pytest.importorskip("tensorflow")

from tests.conformance.random_pipelines import build, pipeline_code
from tests.conformance.test_vs_tfdata import (
    assert_cardinality_matches,
    assert_element_spec_matches,
    assert_elements_match,
)

# A sample, to keep the suite's time: seeds 0-399 all compared equal when it was written.
# (TensorFlow 2.21 itself can crash, a segmentation fault, on padded_batch of rank-1
# elements of length 0 that feedline batches; none of these seeds makes one.)
SEEDS = range(60)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", SEEDS)
def test_a_random_pipeline_matches_tf_data(seed: int) -> None:
    code = pipeline_code(seed)
    check = build(code)
    assert_elements_match(check)
    assert_cardinality_matches(check)
    assert_element_spec_matches(check)
