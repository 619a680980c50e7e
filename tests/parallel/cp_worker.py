"""Worker of the CPU context-parallel tests: every rank builds the same tiny models and inputs, shards the
transformer over 2 gloo processes and writes its outputs; rank 0's file is compared with a single process.

Besides diffusers' context parallelism, the USP processor swap (the `--parallel-backend xfuser` path) runs with
yunchang's `LongContextAttention`, the Ulysses/ring layer that xfuser's `xFuserLongContextAttention` subclasses
(xfuser itself cannot be imported without a GPU)."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


CASES = {
    # name: (variant, frames, height, width, condition frames, per-frame timestep)
    "reference": ("reference", 3, 8, 12, 0, False),
    "extension": ("extension", 4, 8, 12, 0, True),
    "shot_switching": ("extension", 3, 8, 12, 1, True),
    "avatar": ("avatar", 3, 4, 6, 0, False),  # 18 tokens: the shard boundary falls inside frame 1
}


def inputs_for(name, model):
    from tests.helpers import tiny_inputs

    variant, frames, height, width, condition, per_frame = CASES[name]
    inputs = tiny_inputs(model, variant, frames=frames, height=height, width=width, seed=1)
    if condition:
        inputs["condition_hidden_states"] = torch.randn(
            1, 16, condition, height, width, generator=torch.Generator().manual_seed(2)
        )
    if per_frame:
        inputs["timestep"] = torch.tensor([[700] * frames + [0] * condition])
    return inputs


def usp_attention():
    """yunchang's Ulysses attention over the default group (math SDPA kernel: the CPU one)."""
    from yunchang import LongContextAttention, set_seq_parallel_pg
    from yunchang.kernels import AttnType

    set_seq_parallel_pg(dist.get_world_size(), 1, dist.get_rank(), dist.get_world_size())
    return LongContextAttention(ring_impl_type="basic", attn_type=AttnType.TORCH_MATH)


def shard(model, backend: str) -> None:
    from skyreels_diffusers.parallel import enable_context_parallel
    from skyreels_diffusers.parallel.xfuser import enable_usp

    if backend == "diffusers":
        enable_context_parallel(model, ulysses_degree=2)
    elif backend == "usp":
        enable_usp(model, usp_attention(), ulysses_degree=2, ring_degree=1, device=torch.device("cpu"))


def run_cases(backend: str | None) -> dict:
    from tests.helpers import tiny_transformer

    outputs = {}
    for name, (variant, *_rest) in CASES.items():
        model = tiny_transformer(variant, seed=7)
        inputs = inputs_for(name, model)
        if backend:
            shard(model, backend)
        seen = []
        hook = model.blocks[-1].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
        with torch.no_grad():
            outputs[name] = model(**inputs).sample
        hook.remove()
        outputs[f"{name}.tokens_in_last_block"] = torch.tensor(seen[0])
    return outputs


def uneven_error(backend: str) -> str:
    """The message for 3 x 3 x 5 = 45 tokens over 2 ranks under the USP backend (which cannot split unevenly)."""
    from tests.helpers import tiny_inputs, tiny_transformer

    model = tiny_transformer("reference", seed=7)
    inputs = tiny_inputs(model, "reference", frames=3, height=6, width=10, seed=1)
    shard(model, backend)
    try:
        with torch.no_grad():
            model(**inputs)
    except ValueError as error:
        return str(error)
    return ""


def run_pipeline(parallel: bool) -> torch.Tensor:
    from skyreels_diffusers.app.tiny import tiny_pipeline
    from skyreels_diffusers.parallel import enable_context_parallel
    from tests.helpers import random_video

    pipe = tiny_pipeline("single_shot_extension")
    pipe.set_progress_bar_config(disable=True)
    if parallel:
        enable_context_parallel(pipe.transformer, ulysses_degree=2)
    return pipe(
        video=random_video(),
        prompt="go on",
        duration=1,
        height=32,
        width=48,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).frames


def main(out_dir: str) -> None:
    parallel = "WORLD_SIZE" in os.environ
    if parallel:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    outputs = run_cases("diffusers" if parallel else None)
    outputs["pipeline"] = run_pipeline(parallel)
    extra = {}
    if parallel:
        extra = {f"usp.{name}": value for name, value in run_cases("usp").items()}
        extra["usp.uneven_error"] = uneven_error("usp")
    rank = dist.get_rank() if parallel else "single"
    torch.save({**outputs, **extra}, os.path.join(out_dir, f"out_{rank}.pt"))
    if parallel:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
