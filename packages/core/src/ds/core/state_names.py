"""How training state maps onto the names of a universal checkpoint.

Every partitioner describes what it holds as :class:`Segment` objects: "elements
[start, start+numel) of this master tensor are elements [flat_offset, flat_offset+numel)
of the flattened parameter ``name``". Plain data parallelism has one whole segment per
parameter; ZeRO's flat partitions cut parameters into arbitrary ranges. Writing and
reading through segments is what lets a checkpoint saved under one layout load under
any other: the names are the model's parameter names, never rank-local indices.

Names: ``model/<fqn>`` (fp32 master weights) and ``optimizer/<fqn>/<state key>``.
Optimizer state with one value per parameter (Adam's ``step``) is stored once, by the
segment that starts the parameter. Frozen parameters and persistent buffers, which no
partitioner owns, are stored whole under ``model/<fqn>`` in the dtype the model holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

if TYPE_CHECKING:
    from ds.core.checkpoint import CheckpointReader, TensorShard

MODEL_PREFIX = "model/"
OPTIMIZER_PREFIX = "optimizer/"


@dataclass(frozen=True)
class Segment:
    """A contiguous piece of one parameter held inside one master tensor."""

    name: str
    global_shape: tuple[int, ...]
    flat_offset: int
    master: torch.Tensor
    start: int
    numel: int


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The rank-local part of a DTensor (FSDP-sharded state), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _like_master(values: torch.Tensor, master: torch.Tensor) -> torch.Tensor:
    """Wrap rank-local optimizer state like its (possibly DTensor) master."""
    if isinstance(master, DTensor):
        return DTensor.from_local(values, master.device_mesh, master.placements, run_check=False,
                                  shape=master.shape, stride=master.stride())
    return values


def named_trainable_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters by fully qualified name; tied weights appear once."""
    return [(name, p) for name, p in module.named_parameters() if p.requires_grad]


def whole_segments(names: list[str], masters: list[torch.Tensor]) -> list[Segment]:
    """One segment per parameter, for layouts that keep parameters whole."""
    return [
        Segment(name, tuple(master.shape), 0, master, 0, master.numel())
        for name, master in zip(names, masters, strict=True)
    ]


def _is_per_element(value: torch.Tensor, master: torch.Tensor) -> bool:
    return value.numel() == master.numel() and (value.dim() > 0 or master.dim() == 0)


def master_shards(segments: list[Segment]) -> list[TensorShard]:
    from ds.core.checkpoint import TensorShard

    return [
        TensorShard(
            MODEL_PREFIX + s.name,
            s.global_shape,
            local(s.master).detach().reshape(-1)[s.start : s.start + s.numel].float(),
            s.flat_offset,
        )
        for s in segments
    ]


def optimizer_state_shards(optimizer: torch.optim.Optimizer, segments: list[Segment]) -> list[TensorShard]:
    from ds.core.checkpoint import TensorShard

    shards = []
    for seg in segments:
        state = optimizer.state.get(seg.master, {})
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value, dtype=torch.float64)
            value = local(value)
            name = f"{OPTIMIZER_PREFIX}{seg.name}/{key}"
            if _is_per_element(value, local(seg.master)):
                flat = value.detach().reshape(-1)[seg.start : seg.start + seg.numel]
                shards.append(TensorShard(name, seg.global_shape, flat, seg.flat_offset))
            elif seg.flat_offset == 0:
                # A copy: parameters sharing one master (a ZeRO flat group) share its ``step``
                # tensor, and safetensors refuses to write one storage under two names.
                shards.append(TensorShard(name, tuple(value.shape), value.detach().reshape(-1).clone(), 0))
    return shards


def load_masters(reader: CheckpointReader, segments: list[Segment]) -> None:
    with torch.no_grad():
        for seg in segments:
            values = reader.read(MODEL_PREFIX + seg.name, seg.flat_offset, seg.flat_offset + seg.numel)
            target = local(seg.master).view(-1)[seg.start : seg.start + seg.numel]
            target.copy_(values.to(target.dtype))


def load_optimizer_state(optimizer: torch.optim.Optimizer, reader: CheckpointReader, segments: list[Segment]) -> None:
    """Fill optimizer state for every master from whatever layout wrote the checkpoint."""
    names = reader.names()
    keys_of: dict[str, list[str]] = {}
    for full in names:
        if full.startswith(OPTIMIZER_PREFIX):
            param, _, key = full[len(OPTIMIZER_PREFIX) :].rpartition("/")
            keys_of.setdefault(param, []).append(key)
    per_element = _per_element_keys(reader, keys_of)
    loaded: dict[int, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for seg in segments:
            state = loaded.setdefault(id(seg.master), {})
            for key in keys_of.get(seg.name, []):
                name = f"{OPTIMIZER_PREFIX}{seg.name}/{key}"
                shape = tuple(reader.global_shape(name))
                if shape == seg.global_shape and (len(shape) > 0 or key in per_element or seg.master.dim() == 0):
                    if key not in state:
                        state[key] = torch.zeros_like(local(seg.master), dtype=reader.dtype(name))
                    values = reader.read(name, seg.flat_offset, seg.flat_offset + seg.numel)
                    state[key].view(-1)[seg.start : seg.start + seg.numel].copy_(values)
                else:
                    state[key] = reader.read_full(name).to(local(seg.master).device)
    for master in {id(s.master): s.master for s in segments}.values():
        if loaded.get(id(master)):
            state = {k: _like_master(v, master) if v.shape == local(master).shape and v.dim() > 0 else v
                     for k, v in loaded[id(master)].items()}
            optimizer.state[master] = _match_step_dtype(optimizer, state)


def untrained_state(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Persistent buffers and frozen parameters, by the names ``state_dict`` gives them.

    Aliases of trainable parameters (a tied ``lm_head.weight``) are left out: the
    partitioner stores those under the parameter's first name.
    """
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    return [(name, t) for name, t in module.state_dict(keep_vars=True).items() if id(t) not in trainable]


def untrained_state_shards(module: nn.Module, rank: int) -> list[TensorShard]:
    """Rank 0's copy of :func:`untrained_state`; a collective where ZeRO-3 shards frozen parameters."""
    from ds.core.checkpoint import TensorShard

    shards = []
    for name, tensor in untrained_state(module):
        whole = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if rank == 0:
            shards.append(TensorShard.full(MODEL_PREFIX + name, whole.detach().cpu()))
    return shards


def load_untrained_state(module: nn.Module, reader: CheckpointReader) -> None:
    with torch.no_grad():
        for name, tensor in untrained_state(module):
            values = reader.read_full(MODEL_PREFIX + name).to(local(tensor).device)
            if isinstance(tensor, DTensor):  # cut locally as the sharding cuts it, no communication
                values = distribute_tensor(values, tensor.device_mesh, tensor.placements, src_data_rank=None).to_local()
            local(tensor).copy_(values)


def _per_element_keys(reader: CheckpointReader, keys_of: dict[str, list[str]]) -> set[str]:
    """State keys holding one value per parameter element (Adam's ``exp_avg``), not one per
    parameter (``step``). A scalar parameter's state cannot tell them apart by shape, and
    inside a ZeRO flat group the difference decides whether a value fills the parameter's
    range of the group's state or is the whole group's ``step``; other parameters tell."""
    keys: set[str] = set()
    for param, param_keys in keys_of.items():
        shape = tuple(reader.global_shape(MODEL_PREFIX + param)) if MODEL_PREFIX + param in reader else ()
        if shape:
            keys.update(k for k in param_keys if tuple(reader.global_shape(f"{OPTIMIZER_PREFIX}{param}/{k}")) == shape)
    return keys


def _match_step_dtype(optimizer: torch.optim.Optimizer, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # torch's Adam family keeps ``step`` as a float32 tensor; a float64 value written for
    # a Python-number step must come back as the type that optimizer expects.
    step = state.get("step")
    if step is not None and step.dtype == torch.float64 and type(optimizer).__module__.startswith("torch.optim"):
        state["step"] = step.to(torch.float32)
    return state
