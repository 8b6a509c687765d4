"""A plugin's partitioner and communicator replace core's through the hooks.

The test plugin registers a partitioner (``ds_register_partitioners``), claims every run
for it (``ds_choose_partitioner``), and registers a communicator
(``ds_register_communicators``) that counts the collectives it carries. Training on two
gloo processes must go through both, and still match core's own data parallelism.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch

import ds.core
from ds.core import hookimpl
from ds.core.comm import torch_communicator_factory
from ds.core.data_parallel import DataParallelPartitioner
from ds.core.errors import PluginError
from ds.core.plugins import load_components, make_plugin_set
from ds.core.testing import run_distributed
from ds.core.testing.parity import SEQ, VOCAB, make_model


class CountingCommunicator:
    """Delegates to the torch communicator and counts each collective by name."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if callable(value) and name in {"all_reduce", "broadcast", "reduce_scatter_tensor", "all_gather_into_tensor"}:
            def counted(*args: Any, **kwargs: Any) -> Any:
                self.calls[name] += 1
                return value(*args, **kwargs)

            return counted
        return value


class RecordingPartitioner(DataParallelPartitioner):
    built = 0

    def __init__(self, context: Any) -> None:
        type(self).built += 1
        super().__init__(context)


class TestPlugin:
    @staticmethod
    @hookimpl
    def ds_register_partitioners(register: Any) -> None:
        register("recording", RecordingPartitioner)

    @staticmethod
    @hookimpl
    def ds_choose_partitioner(config: Any) -> str:
        return "recording"

    @staticmethod
    @hookimpl
    def ds_register_communicators(register: Any) -> None:
        register("counting", lambda config: CountingCommunicator(torch_communicator_factory(config)))


def _components() -> Any:
    return load_components(make_plugin_set(autoload=False, extra_plugins=(("test", TestPlugin),)))


def _train_with_plugin() -> dict[str, Any]:
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        "communicator": {"backend": "counting"},
    }
    engine, _, _, _ = ds.core.initialize(model=make_model(), config=config, components=_components())
    torch.manual_seed(0)
    for _ in range(3):
        engine.backward(engine(torch.randint(0, VOCAB, (2, SEQ))))
        engine.step()
    return {
        "partitioner": engine.partitioner_name,
        "built": RecordingPartitioner.built,
        "calls": dict(engine.comm.calls),
    }


def test_plugin_partitioner_and_communicator_are_used() -> None:
    for result in run_distributed(_train_with_plugin, 2):
        assert result["partitioner"] == "recording" and result["built"] == 1
        assert result["calls"]["broadcast"] > 0  # initial weights from rank 0
        assert result["calls"]["all_reduce"] >= 3  # at least one gradient bucket per step


def test_duplicate_partitioner_names_both_plugins() -> None:
    class Clash:
        @staticmethod
        @hookimpl
        def ds_register_partitioners(register: Any) -> None:
            register("data_parallel", RecordingPartitioner)

    with pytest.raises(PluginError, match="'core'.*'clash'"):
        load_components(make_plugin_set(autoload=False, extra_plugins=(("clash", Clash),)))
