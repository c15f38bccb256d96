"""rejection_resample: resample a dataset towards a target distribution of classes (tf.data's
``Dataset.rejection_resample`` and ``tf.data.experimental.rejection_resample``).

Built as tf.data builds it, from public operations, so it resumes from a state and runs in
parallel like any pipeline: each element's class is ``class_func(element)``; an element of
class ``c`` is kept with probability ``a[c]``, and a share ``m`` of the output is drawn from the
input as it is (``sample_from_datasets`` of the two), where, for the initial distribution
``p`` and the target ``t``, ``r = t / p``, ``m = min(r)`` and ``a = (r - m) / (max(r) - m)``.
Without ``initial_dist``, ``p`` is estimated as the data goes by: class counts (each starting
at 10) updated every 32 elements. The outputs are ``(class, element)`` pairs.

The random draws come from ``random_map`` and ``sample_from_datasets``: reproducible with a seed
at any parallelism and after a restore, but not tf.data's numbers. Where ``initial_dist`` equals
``target_dist`` nothing is drawn, and the output is tf.data's, element for element.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from feedline.ops.base import call_with_element

if TYPE_CHECKING:
    from feedline.dataset import Dataset

# tf.data's estimate of the initial distribution: counts start at this, and are updated once
# per this many elements.
_SMOOTHING = 10
_ESTIMATION_BATCH = 32
_TINY = np.finfo(np.float32).tiny


def distribution(value: Any, what: str, classes: int | None = None) -> np.ndarray:
    """A probability vector (float32, as tf.data casts it), checked where tf.data would fail
    later or silently: one dimension, no negative value, a positive sum."""
    dist = np.asarray(value, dtype=np.float32)
    if dist.ndim != 1 or dist.size == 0:
        raise ValueError(f"{what} must be a non-empty vector, got shape {dist.shape}")
    if classes is not None and dist.size != classes:
        raise ValueError(f"{what} has {dist.size} classes, target_dist {classes}")
    if not np.all(np.isfinite(dist)) or np.any(dist < 0) or dist.sum() <= 0:
        raise ValueError(f"{what} must hold non-negative probabilities, got {dist.tolist()}")
    return dist


def acceptance(initial: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """tf.data's acceptance probability per class, and the share of the output drawn from the
    input as it is (``_calculate_acceptance_probs_with_mixing``)."""
    ratio = target / (initial + _TINY)
    low, high = ratio.min(), ratio.max()
    accept = (ratio - low) / (high - low) if high > low else np.zeros_like(ratio)
    return accept.astype(np.float32), np.float32(low)


def rejection_resample(
    dataset: Dataset,
    class_func: Any,
    target_dist: Any,
    initial_dist: Any = None,
    seed: int | None = None,
) -> Dataset:
    """``(class, element)`` pairs of ``dataset``, resampled towards ``target_dist``."""
    from feedline.dataset import Dataset

    target = distribution(target_dist, "target_dist")

    def label_of(element: Any) -> Any:
        return call_with_element(class_func, element)

    def with_label(*parts: Any) -> Any:
        element = parts if len(parts) > 1 else parts[0]
        return label_of(element), element

    if initial_dist is not None:
        initial = distribution(initial_dist, "initial_dist", target.size)
        accept, original = acceptance(initial, target)
        with np.errstate(divide="ignore", invalid="ignore"):
            share = float(np.min(target / initial))
        if share == 1:  # the input already has the target distribution: nothing to draw
            return dataset.map(with_label)
        accepts = Dataset.from_tensors(accept).repeat()
        originals = Dataset.from_tensors(original).repeat()
    else:
        share = None
        labels = dataset.map(lambda *parts: label_of(parts if len(parts) > 1 else parts[0]))
        estimates = _estimated_distribution(labels, target.size)
        both = estimates.map(lambda p: acceptance(p, target))
        accepts = both.map(lambda a, m: a)
        originals = both.map(lambda a, m: m)

    def keep(accept_per_class: np.ndarray, element: Any, rng: np.random.Generator) -> Any:
        label = label_of(element)
        return label, element, rng.random(dtype=np.float32) < accept_per_class[label]

    kept = (
        Dataset.zip(accepts, dataset)
        .random_map(keep, seed=seed)
        .filter(lambda label, element, chosen: chosen)
        .map(lambda label, element, chosen: (label, element))
    )
    if share == 0:  # every output element is drawn
        return kept
    weights = originals.map(lambda m: np.array([m, 1 - m], dtype=np.float32))
    return Dataset.sample_from_datasets(
        [dataset.map(with_label), kept], weights=weights, seed=seed, stop_on_empty_dataset=True
    )


def _estimated_distribution(classes: Dataset, n: int) -> Dataset:
    """tf.data's running estimate of the class distribution: one vector per element, counts
    updated every ``_ESTIMATION_BATCH`` elements (``_estimate_initial_dist_ds``)."""

    def update(counts: np.ndarray, batch: np.ndarray) -> Any:
        # As tf.data's one_hot, a class outside [0, n) counts for none.
        seen = batch[(batch >= 0) & (batch < n)].astype(np.int64)
        counts = counts + np.bincount(seen, minlength=n)
        dist = (counts / counts.sum()).astype(np.float32)
        return counts, np.tile(dist, (len(batch), 1))

    start = np.full(n, _SMOOTHING, dtype=np.int64)
    return classes.batch(_ESTIMATION_BATCH).scan(start, update).unbatch()
