"""Sequence (context) parallelism through diffusers' declared `_cp_plan`: Ulysses (all-to-all over heads), ring, or
both, on CUDA (NCCL) and on CPU-only machines (gloo), where the same code runs for tests and for newcomers.

The transformer declares what is split and gathered (`SkyReelsV3Transformer3DModel._cp_plan`); the processors
receive the parallel config through diffusers' `enable_parallelism` contract. Nothing here patches a forward.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int, torch.device]:
    """Initialise the default process group from torchrun's environment (NCCL on GPUs, gloo on CPUs); returns
    (rank, world size, device). A no-op returning (0, 1, device) outside torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world_size == 1:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if cuda:
            # the device is set first and not passed as `device_id`: NCCL's eager (device-side) rendezvous breaks
            # the `new_group` calls of device meshes and of xfuser's process groups
            torch.cuda.set_device(local_rank)
            dist.init_process_group("cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group("gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def broadcast_from_main(value=None):
    """Rank 0's `value` (any picklable object) on every rank; `value` itself outside torchrun."""
    if not dist.is_initialized():
        return value
    payload = [value]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]


def check_degrees(num_heads: int, ulysses_degree: int, ring_degree: int, world_size: int) -> None:
    """Clear errors for impossible layouts (raised before any model work)."""
    if ulysses_degree < 1 or ring_degree < 1:
        raise ValueError(f"--ulysses-degree and --ring-degree must be >= 1, got {ulysses_degree} and {ring_degree}.")
    if num_heads % ulysses_degree:
        raise ValueError(
            f"--ulysses-degree {ulysses_degree} must divide the {num_heads} attention heads "
            f"(e.g. {', '.join(str(d) for d in range(1, num_heads + 1) if num_heads % d == 0 and d <= 8)})."
        )
    if ulysses_degree * ring_degree != world_size:
        raise ValueError(
            f"--ulysses-degree {ulysses_degree} x --ring-degree {ring_degree} = {ulysses_degree * ring_degree} must "
            f"equal the number of processes ({world_size}; torchrun --nproc_per_node)."
        )


#: attention backends whose kernels return no log-sum-exp: ring attention cannot merge their partial results
#: (diffusers' default `native` SDPA, None = the default)
NO_LSE_BACKENDS = (None, "native")


def check_ring_backend(ring_degree: int, attention_backend: str | None) -> None:
    """A clear error, before any model loads, for ring attention on a backend that cannot do it (diffusers would
    raise "Native attention does not support return_lse=True" at the first attention)."""
    if ring_degree > 1 and attention_backend in NO_LSE_BACKENDS:
        raise ValueError(
            f"ring attention (degree {ring_degree}) merges partial softmaxes by their log-sum-exp, which the default "
            "attention backend (PyTorch SDPA, `native`) does not return: add --attention-backend _native_cudnn "
            "(or flash, _native_flash, sage, fa3), or use --ulysses-degree alone."
        )


def enable_context_parallel(
    model, ulysses_degree: int = 1, ring_degree: int = 1, ulysses_anything: bool = True
) -> None:
    """Shard `model` (a `SkyReelsV3Transformer3DModel`) over the default process group.

    `ulysses_anything=True` lets token counts that do not divide by the degree (e.g. 480P 16:9 reference videos on
    4 GPUs) split unevenly, exactly. On GPUs this is `model.enable_parallelism(...)`; on CPU-only machines (gloo),
    where diffusers cannot derive a device from the accelerator count, the same steps run on a CPU mesh.
    """
    from diffusers import ContextParallelConfig

    world_size = dist.get_world_size() if dist.is_initialized() else 1
    check_degrees(model.config.num_attention_heads, ulysses_degree, ring_degree, world_size)
    cp_config = ContextParallelConfig(
        ulysses_degree=ulysses_degree,
        ring_degree=ring_degree,
        ulysses_anything=ulysses_anything and ring_degree == 1,
        ring_anything=ulysses_anything and ring_degree > 1 and ulysses_degree == 1,
    )
    if torch.accelerator.is_available() and torch.accelerator.device_count() > 0:
        model.enable_parallelism(config=cp_config)
        return
    apply_cp_plan(model, cp_config, torch.device("cpu"))


def apply_cp_plan(model, cp_config, device: torch.device) -> None:
    """The steps of diffusers' `enable_parallelism` on an explicit device mesh: the parallel config reaches the
    model and every processor that declares `_parallel_config`, and the `_cp_plan` split/gather hooks are
    registered. Used on CPU (gloo; diffusers derives the device from the accelerator count) and under xfuser."""
    from diffusers.hooks.context_parallel import apply_context_parallel
    from diffusers.models._modeling_parallel import ParallelConfig

    config = ParallelConfig(context_parallel_config=cp_config)
    mesh = torch.distributed.device_mesh.init_device_mesh(
        device.type, mesh_shape=cp_config.mesh_shape, mesh_dim_names=cp_config.mesh_dim_names
    )
    config.setup(dist.get_rank(), dist.get_world_size(), device, mesh=mesh)
    model._parallel_config = config
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = config
    apply_context_parallel(model, cp_config, model._cp_plan)
