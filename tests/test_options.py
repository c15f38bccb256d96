"""Options: tf.data's spellings mapped, accepted or refused; no name accepted and ignored."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import numpy as np
import pytest

import feedline as fl
from feedline.options import (
    AutoShardPolicy,
    OptionGroup,
    ResolvedOptions,
)
from feedline.runtime.machine import default_thread_budget


def _resolve(options: fl.Options) -> ResolvedOptions:
    return ResolvedOptions.of(options)


def _set(options: fl.Options, path: str, value: Any) -> None:
    *groups, last = path.split(".")
    target: Any = options
    for group in groups:
        target = getattr(target, group)
    setattr(target, last, value)


def test_experimental_deterministic_is_deterministic() -> None:
    options = fl.Options()
    options.experimental_deterministic = False
    assert options.deterministic is False
    assert options.experimental_deterministic is False
    assert _resolve(options).deterministic is False


def test_experimental_threading_is_threading() -> None:
    options = fl.Options()
    options.experimental_threading.private_threadpool_size = 7
    assert options.threading.private_threadpool_size == 7
    assert options.experimental_threading is options.threading


def test_private_threadpool_size_caps_the_pass_threads() -> None:
    options = fl.Options()
    assert _resolve(options).thread_budget == default_thread_budget()
    options.threading.private_threadpool_size = 0  # tf.data's "default"
    assert _resolve(options).thread_budget == default_thread_budget()
    options.threading.private_threadpool_size = 12
    assert _resolve(options).thread_budget == 12
    options.autotune.max_threads = 5  # both caps hold: the smaller wins
    assert _resolve(options).thread_budget == 5


def test_a_thread_cap_reaches_the_running_pass() -> None:
    options = fl.Options()
    options.threading.private_threadpool_size = 3
    ds = fl.Dataset.range(20).map(lambda x: x + 1, num_parallel_calls=2).with_options(options)
    with ds.iterator() as it:
        assert list(it) == list(range(1, 21))
        assert it._ctx.options.thread_budget == 3  # type: ignore[attr-defined]


def test_autotune_budgets_keep_their_tf_names() -> None:
    options = fl.Options()
    options.autotune.enabled = False
    options.autotune.cpu_budget = 2
    options.autotune.ram_budget = 2**30
    resolved = _resolve(options)
    assert resolved.autotune_enabled is False
    assert (resolved.autotune.cpu_budget, resolved.autotune.ram_budget) == (2, 2**30)


@pytest.mark.parametrize(
    ("path", "nearest"),
    [
        ("experimental_determinstic", "Options.experimental_deterministic"),
        ("determinism", "Options.deterministic"),
        ("autotune.ram_budjet", "Options.autotune.ram_budget"),
        ("threading.private_threadpool", "Options.threading.private_threadpool_size"),
        ("experimental_optimization.map_fuse", "Options.experimental_optimization.map_fusion"),
        ("experimental_distribute.auto_shard", "Options.experimental_distribute.auto_shard_policy"),
    ],
)
def test_an_unknown_name_is_refused_naming_the_nearest(path: str, nearest: str) -> None:
    options = fl.Options()
    with pytest.raises(AttributeError, match=f"did you mean {nearest}\\?"):
        _set(options, path, True)
    *groups, last = path.split(".")
    target: Any = options
    for group in groups:
        target = getattr(target, group)
    with pytest.raises(AttributeError, match="did you mean"):
        getattr(target, last)
    assert options == fl.Options()  # nothing was set


@pytest.mark.parametrize(
    "path",
    [
        "autotune.autotune_algorithm",
        "autotune.initial_parallelism",
        "autotune.min_parallelism",
        "experimental_slack",
        "experimental_warm_start",
        "experimental_service",
        "experimental_distribute.num_devices",
    ],
)
def test_tf_options_feedline_cannot_honour_are_refused_with_the_reason(path: str) -> None:
    with pytest.raises(AttributeError, match=r"a tf\.data option\) is not supported by feedline"):
        _set(fl.Options(), path, 1)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("threading.max_intra_op_parallelism", 1),
        ("experimental_optimization.map_fusion", True),
        ("experimental_optimization.apply_default_optimizations", False),
        ("experimental_symbolic_checkpoint", True),
        ("experimental_external_state_policy", "WARN"),
        ("dataset_name", "train"),
        ("framework_type", ["keras"]),
    ],
)
def test_harmless_tf_options_are_kept_and_leave_the_elements_alone(path: str, value: Any) -> None:
    options = fl.Options()
    _set(options, path, value)
    ds = fl.Dataset.range(5).map(lambda x: x * 2).with_options(options)
    assert list(ds) == [0, 2, 4, 6, 8]
    assert copy.deepcopy(ds.options()) == ds.options()


def test_values_are_checked_where_they_are_assigned() -> None:
    options = fl.Options()
    with pytest.raises(TypeError, match=r"Options\.deterministic must be a bool"):
        options.deterministic = "yes"
    with pytest.raises(ValueError, match=r"Options\.autotune\.cpu_budget must be >= 0"):
        options.autotune.cpu_budget = -1
    with pytest.raises(TypeError, match=r"Options\.threading\.private_threadpool_size"):
        options.threading.private_threadpool_size = 2.5
    with pytest.raises(ValueError, match=r"Options\.executor must be one of"):
        options.executor = "fork"
    with pytest.raises(TypeError, match="is a group of options"):
        options.autotune = 3  # type: ignore[assignment]
    with pytest.raises(ValueError, match="AutoShardPolicy"):
        options.experimental_distribute.auto_shard_policy = "SOMETIMES"
    options.deterministic = np.bool_(False)
    assert options.deterministic is False


def test_auto_shard_policy_takes_tf_spellings() -> None:
    options = fl.Options()
    for given in (AutoShardPolicy.DATA, "data", 2):
        options.experimental_distribute.auto_shard_policy = given
        assert options.experimental_distribute.auto_shard_policy is AutoShardPolicy.DATA
    assert fl.experimental.AutoShardPolicy is AutoShardPolicy
    assert [(m.name, m.value) for m in AutoShardPolicy] == [
        ("OFF", -1),
        ("AUTO", 0),
        ("FILE", 1),
        ("DATA", 2),
        ("HINT", 3),
    ]


def test_merge_copy_and_pickle_carry_every_group() -> None:
    first = fl.Options()
    first.threading.private_threadpool_size = 4
    first.experimental_optimization.map_fusion = False
    second = fl.Options()
    second.experimental_distribute.auto_shard_policy = AutoShardPolicy.FILE
    second.threading.private_threadpool_size = 9
    ds = fl.Dataset.range(3).with_options(first).with_options(second)
    merged = ds.options()
    assert merged.threading.private_threadpool_size == 9
    assert merged.experimental_optimization.map_fusion is False
    assert merged.experimental_distribute.auto_shard_policy is AutoShardPolicy.FILE
    assert pickle.loads(pickle.dumps(merged)) == merged
    second.threading.private_threadpool_size = 1  # with_options took a copy
    assert ds.options().threading.private_threadpool_size == 9


def _tf_attribute_paths(options: Any, prefix: str = "") -> list[str]:
    paths = []
    for name in dir(options):
        if name.startswith("_") or name == "merge":
            continue
        value = getattr(options, name)
        if type(value).__module__.startswith("tensorflow.python.data") and hasattr(
            value, "_options"
        ):
            paths += _tf_attribute_paths(value, f"{prefix}{name}.")
        else:
            paths.append(prefix + name)
    return paths


@pytest.mark.filterwarnings("ignore")
def test_every_tf_option_is_mapped_kept_or_refused_never_unknown() -> None:
    """Each attribute of tf.data.Options (where TensorFlow is installed) is one of the three
    cases of options.py: never the "no option" error an unknown name gets."""
    tf = pytest.importorskip("tensorflow")
    paths = _tf_attribute_paths(tf.data.Options())
    assert len(paths) > 30
    for path in paths:
        target: Any = fl.Options()
        try:
            for name in path.split("."):
                assert isinstance(target, OptionGroup), path
                target = getattr(target, name)
        except AttributeError as e:  # refused, a whole group (experimental_service) or one
            assert "is not supported by feedline" in str(e), f"{path}: {e}"


def test_the_constructor_takes_options_by_name_and_checks_them() -> None:
    options = fl.Options(experimental_deterministic=False, executor="thread")
    assert (options.deterministic, options.executor) == (False, "thread")
    assert fl.AutotuneOptions(ram_budget=7).ram_budget == 7
    with pytest.raises(AttributeError, match=r"did you mean Options\.deterministic\?"):
        fl.Options(determinstic=False)
    with pytest.raises(TypeError, match="must be a bool"):
        fl.Options(deterministic=1)
    assert fl.Options().autotune is not fl.Options().autotune  # each its own groups
