"""Worker of the CPU context-parallel tests: every rank builds the same tiny models and inputs, shards the
transformer over 2 gloo processes and writes its outputs; rank 0's file is compared with a single process."""

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
        inputs["condition_hidden_states"] = torch.randn(1, 16, condition, height, width,
                                                        generator=torch.Generator().manual_seed(2))
    if per_frame:
        inputs["timestep"] = torch.tensor([[700] * frames + [0] * condition])
    return inputs


def run_cases(parallel: bool) -> dict:
    from skyreels_diffusers.parallel import enable_context_parallel
    from tests.helpers import tiny_transformer

    outputs = {}
    for name, (variant, *_rest) in CASES.items():
        model = tiny_transformer(variant, seed=7)
        inputs = inputs_for(name, model)
        if parallel:
            enable_context_parallel(model, ulysses_degree=2)
        seen = []
        hook = model.blocks[-1].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
        with torch.no_grad():
            outputs[name] = model(**inputs).sample
        hook.remove()
        outputs[f"{name}.tokens_in_last_block"] = torch.tensor(seen[0])
    return outputs


def run_pipeline(parallel: bool) -> torch.Tensor:
    from skyreels_diffusers.parallel import enable_context_parallel
    from skyreels_diffusers.pipelines.tiny import tiny_pipeline
    from tests.helpers import random_video

    pipe = tiny_pipeline("single_shot_extension")
    pipe.set_progress_bar_config(disable=True)
    if parallel:
        enable_context_parallel(pipe.transformer, ulysses_degree=2)
    return pipe(video=random_video(), prompt="go on", duration=1, height=32, width=48, num_inference_steps=2,
                generator=torch.Generator().manual_seed(0), output_type="pt").frames


def main(out_dir: str) -> None:
    parallel = "WORLD_SIZE" in os.environ
    if parallel:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    outputs = run_cases(parallel)
    outputs["pipeline"] = run_pipeline(parallel)
    rank = dist.get_rank() if parallel else "single"
    torch.save(outputs, os.path.join(out_dir, f"out_{rank}.pt"))
    if parallel:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
