"""``ds.zero.Init``: build a model already sharded over the data-parallel ranks.

    with ds.zero.Init(config="ds_config.json"):
        model = MyModel()            # every rank holds 1/N of each parameter
    engine, *_ = ds.core.initialize(model=model, config="ds_config.json")  # ZeRO stage 3

A model too large for one rank's memory can be built this way, because no rank ever
holds more than its shards plus one module in full. DeepSpeed's ``zero.Init`` gets
there by replacing ``torch.empty`` & co. and every module's ``__init__`` while the block
runs; ds uses only torch's public module registration hooks, removed on exit:

1. While the block runs, each parameter a module registers is replaced at once by a
   ``meta`` placeholder of the same shape and dtype, so the tensor the module allocated
   is freed before the next one is created (peak: one parameter). Buffers are left
   alone: they are small, stage 3 does not shard them, and their values (rotary
   frequencies, say) are computed in ``__init__`` and could not be recomputed.
2. When the block ends, modules are visited children first, in registration order,
   which is the order eager construction initialises them in. For each module owning
   placeholders: allocate its parameters whole on the CPU, initialise them, cut out this
   rank's dim-0 slice, free the rest.

Initialisers, the first that applies: ``init_module(module)`` if given; the
``_init_weights(module)`` of the closest enclosing Hugging Face ``PreTrainedModel``;
``module.reset_parameters()``. A module that owns parameters and has none of these is
an error: the values its ``__init__`` wrote went to a tensor that no longer exists.
Initialisers must set only the module's own parameters (torch's modules do).

Determinism: every rank draws the same full values from one CPU generator stream that
starts at ``seed`` (or where rank 0's generator stands on entry, broadcast to all) and
advances module by module, as eager construction advances it. For models initialised by
``reset_parameters`` the result is exactly ``torch.manual_seed(s); MyModel()``, for any
world size, and the generator is left where that would leave it.

Result: every parameter with at least one dimension is a ``DTensor`` placed
``Shard(0)`` on a 1-D device mesh named ``dp`` (the data-parallel group, chunked as
``torch.chunk`` does, which is how ``fully_shard`` chunks); scalars stay whole. Stage 3
adopts these shards as they are (:mod:`ds.zero.init_layout`); use
:class:`ds.zero.GatheredParameters` to see or edit whole values. Stages 0-2 keep whole
parameters on every rank, so with a config whose ``zero_optimization.stage`` is not 3
the block builds the model normally.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.nn.modules.module import (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)
from torch.utils.weak import WeakTensorKeyDictionary

from ds.core.errors import ConfigError, DsError
from ds.zero.init_layout import DP_DIM, local_slice, zero_stage

if TYPE_CHECKING:
    from ds.core.comm import TorchCommunicator
    from ds.core.config import DsConfig
    from ds.core.mesh import Mesh

_MATERIALISE_ON = torch.device("cpu")
_ACTIVE: list[Init] = []
"""The Init block now running in this process, if any; nested blocks leave it the work."""


class Init:
    """Context manager: parameters registered inside are sharded over the dp ranks on exit.

    * ``config``: the run's ds config (path, JSON, dict or loaded); sizes the ``dp``
      group from its ``mesh`` section and turns Init off unless ZeRO stage is 3;
    * ``mesh``: the :class:`ds.core.mesh.Mesh` or 1-D ``DeviceMesh`` named ``dp`` to shard
      over; default: every rank (after ``config``'s model-parallel axes);
    * ``dtype``: dtype of the stored shards (default: what each module declares);
    * ``device``: where shards live (default: the mesh's device);
    * ``seed``: seed of the generator stream; default: rank 0's current CPU generator;
    * ``init_module``: ``fn(module)`` setting the module's own parameters, used instead
      of ``reset_parameters`` / ``_init_weights``;
    * ``enabled``: False builds the model normally.

    If torch.distributed was not started yet, Init starts it (from the launcher's
    environment, or as one process) and keeps that communicator as ``communicator``;
    ``ds.core.initialize`` reuses the process group.
    """

    def __init__(
        self,
        config: str | os.PathLike[str] | dict[str, Any] | DsConfig | None = None,
        *,
        mesh: Mesh | DeviceMesh | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        seed: int | None = None,
        init_module: Callable[[nn.Module], None] | None = None,
        enabled: bool = True,
    ) -> None:
        self.communicator: TorchCommunicator | None = None
        loaded = _load(config) if config is not None else None
        self.enabled = enabled and (loaded is None or zero_stage(loaded) == 3)
        self._dtype = dtype
        self._seed = seed
        self._init_module = init_module
        self._hooks: list[Any] = []
        self._built = _Construction()
        self._outermost = False
        if not self.enabled:
            return
        self.mesh = self._dp_mesh(mesh, loaded)
        self.device = torch.device(device) if device is not None else _mesh_device(self.mesh)

    # -- the dp mesh ------------------------------------------------------------------

    def _dp_mesh(self, mesh: Mesh | DeviceMesh | None, config: DsConfig | None) -> DeviceMesh:
        if isinstance(mesh, DeviceMesh):
            if mesh.ndim != 1 or mesh.mesh_dim_names != (DP_DIM,):
                raise ConfigError(
                    f"ds.zero.Init(mesh=...) needs a 1-D DeviceMesh named {DP_DIM!r}, got dims "
                    f"{mesh.mesh_dim_names}; pass the ds Mesh (ds.core.mesh.Mesh) or its submesh('dp')."
                )
            return mesh
        if mesh is not None:
            return mesh.submesh(DP_DIM)
        from ds.core.comm import init_distributed
        from ds.core.mesh import Mesh

        started = not dist.is_initialized()
        comm = init_distributed()
        try:
            if config is not None:
                axes = config.mesh
                return Mesh.build(comm, pp=axes.pp, tp=axes.tp, sp=axes.sp, ep=axes.ep).submesh(DP_DIM)
            return init_device_mesh(comm.device.type, (comm.world_size,), mesh_dim_names=(DP_DIM,))
        finally:
            if started:
                self.communicator = comm  # owns the process group ds.core.initialize will reuse
            else:
                comm.destroy()  # stops only its heartbeat: the group belongs to whoever started it

    # -- the context ------------------------------------------------------------------

    def __enter__(self) -> Init:
        self._outermost = self.enabled and not _ACTIVE
        if not self._outermost:
            return self  # disabled, or nested (e.g. a library's Init inside the user's): one block shards
        _ACTIVE.append(self)
        self._sync_generator()
        self._hooks = [
            # torch annotates the hook as returning None, but registers a returned parameter.
            register_module_parameter_registration_hook(self._on_parameter),  # type: ignore[arg-type]
            register_module_module_registration_hook(self._on_submodule),
        ]
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._outermost:
            return
        _ACTIVE.remove(self)
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        built, self._built = self._built, _Construction()
        if exc_type is None:
            self._materialise(built)

    def _sync_generator(self) -> None:
        if self._seed is not None:
            torch.manual_seed(self._seed)
            return
        group = self.mesh.get_group()
        if dist.get_world_size(group) > 1:
            state = torch.get_rng_state()
            dist.broadcast(state, src=dist.get_global_rank(group, 0), group=group)
            torch.set_rng_state(state)

    def _on_parameter(self, module: nn.Module, name: str, param: nn.Parameter) -> nn.Parameter | None:
        built = self._built
        built.seen.setdefault(id(module), module)
        if isinstance(param, DTensor) or id(param) in built.placeholders:
            return None  # already Init's: a tied weight registered a second time
        if param.is_meta:
            placeholder = param  # built on meta by the model itself: initialised like the others
        else:
            known = built.placeholder_for.get(param)
            if known is not None:
                return known  # one real parameter registered on two modules stays one
            meta = torch.empty_like(param, device="meta")
            placeholder = built.placeholder_for[param] = nn.Parameter(meta, requires_grad=param.requires_grad)
        built.placeholders[id(placeholder)] = placeholder
        built.registered.setdefault(id(module), {})[name] = placeholder
        return placeholder

    def _on_submodule(self, module: nn.Module, name: str, submodule: nn.Module | None) -> None:
        if submodule is None:
            return
        built = self._built
        built.seen.setdefault(id(module), module)
        built.seen.setdefault(id(submodule), submodule)
        built.children.add(id(submodule))
        built.parent.setdefault(id(submodule), module)

    # -- materialisation --------------------------------------------------------------

    def _materialise(self, built: _Construction) -> None:
        slots = [(m, name, p) for m in built.seen.values() for name, p in m._parameters.items()
                 if p is not None and id(p) in built.placeholders]
        held = {id(p) for _, _, p in slots}
        sharded: dict[int, nn.Parameter] = {}
        roots = [m for key, m in built.seen.items() if key not in built.children]
        order = list(_children_first(roots))
        visited = {id(m) for m in order}
        order += [m for key, m in built.seen.items() if key not in visited]  # detached since
        for module in order:
            own = built.registered.get(id(module))
            if own:
                self._initialise(module, own, held, sharded, built)
        for module, name, placeholder in slots:
            module._parameters[name] = sharded[id(placeholder)]

    def _initialise(
        self,
        module: nn.Module,
        own: dict[str, nn.Parameter],
        held: set[int],
        sharded: dict[int, nn.Parameter],
        built: _Construction,
    ) -> None:
        """Replay the module's initialisation on its own parameters, whole, and keep shards.

        Slots are restored afterwards: a slot may by now hold another module's (tied)
        parameter, while eager construction initialised this module's own before tying.
        """
        in_use = {name: module._parameters.get(name) for name in own}
        for name, placeholder in own.items():
            whole = torch.empty(placeholder.shape, dtype=placeholder.dtype, device=_MATERIALISE_ON)
            module._parameters[name] = nn.Parameter(whole, requires_grad=placeholder.requires_grad)
        kept = any(id(p) in held for p in own.values())
        initialiser = self._initialiser(module, built)
        if initialiser is not None:
            initialiser(module)  # even when nothing is kept: the generator advances as in eager construction
        elif kept:
            raise DsError(
                f"ds.zero.Init cannot initialise {type(module).__qualname__} (parameters {', '.join(own)}): it "
                "has no reset_parameters(), so the values its __init__ wrote are gone. Give it a "
                "reset_parameters() that sets its own parameters, or pass init_module=fn to ds.zero.Init."
            )
        for name, placeholder in own.items():
            if id(placeholder) in held:
                whole_param = module._parameters[name]
                assert whole_param is not None
                sharded[id(placeholder)] = nn.Parameter(
                    self._shard(whole_param.detach()), requires_grad=placeholder.requires_grad
                )
            module._parameters[name] = in_use[name]

    def _initialiser(self, module: nn.Module, built: _Construction) -> Callable[[nn.Module], None] | None:
        if self._init_module is not None:
            return self._init_module
        hf_model = _enclosing_hf_model(module, built)
        if hf_model is not None:
            return hf_model._init_weights
        reset = getattr(module, "reset_parameters", None)
        return (lambda _: reset()) if callable(reset) else None

    def _shard(self, whole: torch.Tensor) -> torch.Tensor:
        dtype = self._dtype or whole.dtype
        if whole.dim() == 0:
            return whole.to(device=self.device, dtype=dtype).clone()
        local = local_slice(whole, self.mesh, (Shard(0),)).to(device=self.device, dtype=dtype).clone()
        return DTensor.from_local(
            local, self.mesh, (Shard(0),), run_check=False, shape=whole.shape, stride=whole.stride()
        )


@dataclass
class _Construction:
    """What the block built, as seen through the registration hooks."""

    seen: dict[int, nn.Module] = field(default_factory=dict)
    children: set[int] = field(default_factory=set)
    parent: dict[int, nn.Module] = field(default_factory=dict)
    placeholders: dict[int, nn.Parameter] = field(default_factory=dict)
    """Every meta placeholder handed out, by id."""
    registered: dict[int, dict[str, nn.Parameter]] = field(default_factory=dict)
    """Per module id: the placeholders it created, by name (its eager initialiser's targets)."""
    placeholder_for: WeakTensorKeyDictionary = field(default_factory=WeakTensorKeyDictionary)
    """A real parameter registered again (shared) maps to the placeholder it became."""


def _enclosing_hf_model(module: nn.Module, built: _Construction) -> Any:
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return None
    node: nn.Module | None = module
    while node is not None:
        if isinstance(node, transformers.PreTrainedModel):
            return node
        node = built.parent.get(id(node))
    return None


def _children_first(roots: list[nn.Module]) -> Iterator[nn.Module]:
    visited: set[int] = set()

    def visit(module: nn.Module) -> Iterator[nn.Module]:
        if id(module) in visited:
            return
        visited.add(id(module))
        for child in module.children():
            yield from visit(child)
        yield module

    for root in roots:
        yield from visit(root)


def _mesh_device(mesh: DeviceMesh) -> torch.device:
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, torch.accelerator.current_device_index())


def _load(config: Any) -> DsConfig:
    from ds.core.config import DsConfig, load_config

    if isinstance(config, DsConfig):
        return config
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    return load_config(config, world_size=world)
