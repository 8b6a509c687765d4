"""Which config keys ds knows, and what to tell the user about the others.

Every key of a config file is one of:

* core's (a field of :class:`~ds.core.config.root.DsConfig`), or an old spelling of one
  (``bfloat16`` -> ``bf16``), accepted with a :class:`DeprecatedKeyWarning`;
* registered by an installed plugin through ``ds_register_config_sections`` (or one of
  the aliases it registered);
* a DeepSpeed setting ds does not honour yet (:data:`NOT_YET_SUPPORTED`): an error that
  says so, never silently ignored. A setting that is switched off (``false``, ``null``,
  ``{"enabled": false}``, ``"auto"``) asks for nothing, so it is accepted and dropped;
* owned by a pillar package that is not installed (:data:`PILLARS`):
  :class:`~ds.core.errors.MissingPillarError` with the pip command that fixes it;
* anything else: an unknown key, reported with the closest valid spelling.
"""

from __future__ import annotations

from dataclasses import dataclass
from difflib import get_close_matches
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from ds.core.config.auto import is_auto
from ds.core.config.base import join_path, warn_renamed
from ds.core.errors import ConfigError, MissingPillarError

if TYPE_CHECKING:
    from collections.abc import Collection, Iterable

    from ds.core.plugins import PluginSet, Registry

NOT_YET_SUPPORTED: dict[str, str] = {
    "amp": "use fp16 or bf16 instead",
    "autotuning": "",
    "comet": "use tensorboard, csv_monitor or wandb instead",
    "curriculum_learning": "",
    "data_efficiency": "",
    "data_types": "",
    "datastates": "",
    "disable_allgather": "",
    "dump_state": "",
    "eigenvalue": "",
    "elasticity": "set the batch sizes directly",
    "flops_profiler": "",
    "fp32_allreduce": 'write "communication_data_type": "fp32" instead',
    "gradient_allreduce_op": "",
    "graph_harvesting": "",
    "hybrid_engine": "",
    "memory_breakdown": "",
    "nebula": "",
    "progressive_layer_drop": "",
    "sparse_attention": "",
    "sparse_gradients": "",
    "timers": "",
    "torch_autocast": "use fp16 or bf16 instead",
    "weight_quantization": "",
    "bf16.bf16_master_weights_and_grads": "",
    "bf16.bf16_optimizer_states": "",
    "checkpoint.parallel_write": "",
    "checkpoint.use_node_local_storage": "",
    "compile.deepcompile": 'ds compiles each repeated block with torch.compile: set "compile": {"enabled": true}',
    "compile.kwargs": "set compile.backend, compile.mode, compile.fullgraph and compile.dynamic instead",
    "compile.offload_activation": "",
    "compile.offload_opt_states": "",
    "fp16.auto_cast": "",
    "fp16.fp16_master_weights_and_grads": "",
    "optimizer.legacy_fusion": "",
    "optimizer.params.max_grad_norm": "clip gradients with the top-level gradient_clipping key instead",
}
"""DeepSpeed settings ds does not honour yet (dotted key path -> what to do instead)."""


@dataclass(frozen=True)
class Pillar:
    """A separately installed ds package and the top-level config keys it owns."""

    distribution: str
    extra: str
    keys: tuple[str, ...]

    @property
    def install_command(self) -> str:
        return f'pip install "ds-core[{self.extra}]"'


PILLARS: tuple[Pillar, ...] = (
    Pillar("ds-zero", "zero", ("zero_optimization", "aio")),
    Pillar(
        "ds-pipeline",
        "pipeline",
        ("pipeline", "tensor_parallel", "sequence_parallel_size", "seq_parallel_comm_data_type"),
    ),
    Pillar("ds-moe", "moe", ("moe", "expert_parallel", "use_data_before_expert_parallelism")),
    Pillar("ds-compression", "compression", ("compression_training", "quantize_training")),
)
"""Which pillar package owns which DeepSpeed keys; the package registers those keys."""

MESH_AXIS_PILLARS: dict[str, str] = {"pp": "ds-pipeline", "tp": "ds-pipeline", "sp": "ds-pipeline",
                                     "ep": "ds-moe"}
"""Mesh axes larger than 1 need the pillar that implements that kind of parallelism."""


def pillar_for_key(key: str) -> Pillar | None:
    return next((p for p in PILLARS if key in p.keys), None)


def is_disabled(value: object) -> bool:
    """Whether a setting asks for nothing: off, empty, or every part of it off."""
    if value is None or value is False or is_auto(value):
        return True
    if isinstance(value, dict):
        if "enabled" in value:
            return is_disabled(value["enabled"])
        return all(is_disabled(v) for v in value.values())
    return False


def closest(key: str, choices: Iterable[str]) -> str | None:
    """The most similar choice, ignoring letter case (``adamw8bit`` -> ``AdamW``)."""
    by_lower = {choice.lower(): choice for choice in choices}
    match = get_close_matches(key.lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[match[0]] if match else None


def unknown_key_message(path: str, key: str, choices: Collection[str]) -> str:
    """``unknown key 'zero_optimization.stgae'; did you mean 'stage'? ...``"""
    suggestion = closest(key, choices)
    hint = f"did you mean '{suggestion}'?" if suggestion else f"valid keys here: {', '.join(sorted(choices))}."
    return f"unknown key '{join_path(path, key)}'; {hint} Fix the spelling or remove the key."


def rename_keys(model: type[BaseModel], data: dict[str, Any], path: str) -> dict[str, Any]:
    """Visitor: rewrite the old spellings a section model lists in ``renamed_keys``."""
    renames: dict[str, str] = getattr(model, "renamed_keys", {})
    return _apply_renames(data, path, renames)


def _apply_renames(data: dict[str, Any], path: str, renames: dict[str, str]) -> dict[str, Any]:
    renamed = dict(data)
    for old, new in renames.items():
        if old not in renamed:
            continue
        old_path, new_path = join_path(path, old), join_path(path, new)
        if new in renamed:
            raise ConfigError(
                f"both '{old_path}' and '{new_path}' are set; '{old_path}' is the old spelling "
                f"of '{new_path}'. Remove '{old_path}'."
            )
        warn_renamed(old_path, new_path)
        renamed[new] = renamed.pop(old)
    return renamed


def rename_registered_aliases(data: dict[str, Any], registry: Registry[Any]) -> dict[str, Any]:
    """Rewrite top-level aliases that plugins registered with their config sections."""
    renames = {key: registry.registration(key).name for key in data
               if key in registry and registry.registration(key).name != key}
    return _apply_renames(data, "", renames)


def drop_unsupported(data: dict[str, Any], plugin_keys: Collection[str]) -> None:
    """Drop switched-off settings ds does not support (in place); reject switched-on ones.

    A key a plugin registered is supported by that plugin, so ``plugin_keys`` are skipped.
    """
    for path, instead in NOT_YET_SUPPORTED.items():
        *parents, leaf = path.split(".")
        if (parents[0] if parents else leaf) in plugin_keys:
            continue
        container: Any = data
        for part in parents:
            container = container.get(part) if isinstance(container, dict) else None
        if not isinstance(container, dict) or leaf not in container:
            continue
        if not is_disabled(container[leaf]):
            fix = f"; {instead}" if instead else ""
            raise ConfigError(
                f"'{path}' is a DeepSpeed setting that ds does not support yet. Remove it from "
                f"your config{fix}. (ds never ignores a setting silently.)"
            )
        del container[leaf]


def check_top_level_keys(
    data: dict[str, Any], core_keys: Collection[str], registry: Registry[Any], plugins: PluginSet
) -> None:
    """Reject keys that no installed package owns, saying which package would."""
    for key in data:
        if key in core_keys or key in registry:
            continue
        pillar = pillar_for_key(key)
        if pillar is not None:
            raise MissingPillarError(_missing_pillar_message(f"config key '{key}'", pillar, plugins))
        choices = [*core_keys, *registry.names(), *(k for p in PILLARS for k in p.keys)]
        raise ConfigError(unknown_key_message("", key, choices))


def check_mesh_pillars(mesh: dict[str, int], registry: Registry[Any], plugins: PluginSet) -> None:
    """Reject parallel mesh axes whose pillar package is not installed."""
    for axis, distribution in MESH_AXIS_PILLARS.items():
        if mesh.get(axis, 1) <= 1:
            continue
        pillar = next(p for p in PILLARS if p.distribution == distribution)
        loaded = any(info.distribution == distribution for info in plugins.loaded)
        if not loaded and not any(key in registry for key in pillar.keys):
            what = f"'mesh.{axis}' = {mesh[axis]}"
            raise MissingPillarError(_missing_pillar_message(what, pillar, plugins))


def _missing_pillar_message(what: str, pillar: Pillar, plugins: PluginSet) -> str:
    failure = next((f for f in plugins.failures if f.distribution == pillar.distribution), None)
    if failure is not None:
        return (f"{what} needs {pillar.distribution}, which is installed but failed to load: "
                f"{failure.error}. Fix: reinstall it with {pillar.install_command}")
    loaded = next((p for p in plugins.loaded if p.distribution == pillar.distribution), None)
    if loaded is not None:
        return (f"{what} needs {pillar.distribution}, but the installed version ({loaded.version}) does not "
                f"register it. Fix: upgrade it with pip install --upgrade \"ds-core[{pillar.extra}]\"")
    return f"{what} needs {pillar.distribution}, which is not installed. Fix: {pillar.install_command}"
