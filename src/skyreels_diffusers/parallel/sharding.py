"""`--shard-weights`: the transformer's weights sharded over the ranks with PyTorch FSDP2 (`fully_shard`).

Each transformer block is one FSDP unit: its parameters live 1/world per rank and are all-gathered just before the
block runs (the next block's gather is issued while the current one computes: forward prefetch) and freed after it.
The rest of the model (patch and condition embedders, output head) is the root unit. Composes with the context-
parallel `_cp_plan` hooks (both act around module calls, on different modules' parameters and activations), so the
same ranks split the tokens and the weights. Weights are numerically untouched: outputs equal the unsharded model's.

A model built on the meta device can be sharded first and materialised after (`model.to_empty(device=...)` then
fill or load): no rank ever holds the whole model.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist


def sharding_mesh(device: torch.device):
    """A one-dimensional mesh over every process (FSDP's), on `device`'s type."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size() if dist.is_initialized() else 1
    return init_device_mesh(device.type, (world,), mesh_dim_names=("fsdp",))


def _main_dtype(params: list[torch.nn.Parameter]) -> torch.dtype:
    """The dtype holding most of the bytes (bf16 for a loaded model, whose `_keep_in_fp32_modules` are fp32)."""
    by_dtype: dict[torch.dtype, int] = {}
    for param in params:
        by_dtype[param.dtype] = by_dtype.get(param.dtype, 0) + param.numel() * param.element_size()
    return max(by_dtype, key=by_dtype.get)


def split_by_dtype(model: torch.nn.Module, min_unit_numel: int = 1 << 20) -> tuple[list, list]:
    """How `shard_transformer` treats parameters outside the main dtype: (modules sharded as units of their own,
    parameters kept whole on every rank). Modules outside the blocks whose parameters are all of one other dtype
    and number at least `min_unit_numel` become units (outermost only); every other such parameter stays whole."""
    main = _main_dtype(list(model.parameters()))
    in_blocks = {id(p) for block in model.blocks for p in block.parameters()}
    units, covered = [], set()
    for name, module in model.named_modules():
        params = list(module.parameters())
        if (
            not name
            or name.startswith("blocks.")
            or not params
            or any(p.dtype == main for p in params)
            or len({p.dtype for p in params}) > 1
            or sum(p.numel() for p in params) < min_unit_numel
            or any(id(p) in in_blocks or id(p) in covered for p in params)
        ):
            continue
        units.append(module)
        covered |= {id(p) for p in params}
    whole = [p for p in model.parameters() if p.dtype != main and id(p) not in covered]
    return units, whole


def shard_transformer(
    model: torch.nn.Module, device: torch.device, prefetch: bool = True, min_unit_numel: int = 1 << 20
) -> torch.nn.Module:
    """Shard `model`'s blocks (one FSDP2 unit each) and the remaining parameters (root unit) over all processes;
    parameters move to `device` as shards (`DTensor`s). `prefetch` issues the next block's all-gather when a block
    starts. Returns `model` (now an FSDP module).

    An FSDP2 unit all-gathers one flat buffer, so its parameters must share a dtype: the float32 ones of a bf16
    model (`_keep_in_fp32_modules`) are sharded as units of their own where they form a module of at least
    `min_unit_numel` elements outside the blocks (the time embedding and projection: 0.7 GB at 14B), and kept
    whole on every rank otherwise (norm weights and modulation tables: about 0.2 MB per block); see
    `split_by_dtype`."""
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise RuntimeError("--shard-weights shards over processes: run under torchrun (one process per GPU).")
    mesh = sharding_mesh(device)
    units, whole = split_by_dtype(model, min_unit_numel)
    kept = {id(p) for p in whole}
    for module in units:
        fully_shard(module, mesh=mesh, reshard_after_forward=True)
    blocks = list(model.blocks)
    for block in blocks:
        fully_shard(
            block,
            mesh=mesh,
            reshard_after_forward=True,
            ignored_params={p for p in block.parameters() if id(p) in kept},
        )
    fully_shard(model, mesh=mesh, reshard_after_forward=True, ignored_params=set(whole))
    for param in whole:  # FSDP leaves the parameters it ignores where they are (meta ones: for `to_empty`)
        if not param.is_meta:
            param.data = param.data.to(device)
    if prefetch:
        for block, following in itertools.pairwise(blocks):
            block.set_modules_to_forward_prefetch([following])
    return model


def _is_dtensor(param: torch.nn.Parameter) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local_parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters this rank holds (a sharded parameter counts its local shard only)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for param in model.parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        total += local.numel() * local.element_size()
    return total


def sharding_plan(model: torch.nn.Module, world: int, min_unit_numel: int = 1 << 20) -> dict:
    """What `shard_transformer` does to `model` over `world` ranks, without doing it: FSDP units, bytes of the
    whole model, of the largest unit (all-gathered at once; two with prefetch), and per rank at rest (each
    parameter's dim-0 shard is `ceil(rows / world)` rows, the last ranks' shorter; the parameters kept whole count
    in full on every rank)."""

    def bytes_of(params) -> int:
        return sum(p.numel() * p.element_size() for p in params)

    def shard_bytes(param: torch.nn.Parameter, rank: int) -> int:
        rows = param.shape[0] if param.dim() else 1
        chunk = -(-rows // world)
        mine = max(0, min(chunk, rows - rank * chunk))
        per_row = param.numel() // rows if rows else 0
        return mine * per_row * param.element_size()

    fp32_units, whole = split_by_dtype(model, min_unit_numel)
    kept = {id(p) for p in whole}
    block_params = {id(p) for block in model.blocks for p in block.parameters()}
    root = [p for p in model.parameters() if id(p) not in block_params]
    units = [bytes_of(block.parameters()) for block in model.blocks]
    params = list(model.parameters())
    per_rank = [sum(bytes_of([p]) if id(p) in kept else shard_bytes(p, r) for p in params) for r in range(world)]
    return {
        "units": len(units) + len(fp32_units) + 1,
        "total_bytes": bytes_of(params),
        "root_bytes": bytes_of(root),
        "whole_bytes": bytes_of(whole),
        "largest_block_bytes": max(units),
        "per_rank_bytes": per_rank,
    }
