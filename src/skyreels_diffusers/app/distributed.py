"""Whole runs across processes (request layer): what `run.run` and `bench/bench_e2e.py` do under torchrun
besides sharding the transformer's tokens.

* Encoders once: `precomputed_embeddings` runs the text encoder (and the avatar's CLIP and wav2vec2) on rank 0 and
  broadcasts the embeddings, which every rank then passes to the pipeline (`prompt_embeds`, `image_embeds`,
  `audio_embeds`, ...); `drop_main_only_encoders` keeps ranks > 0 from loading the text and audio encoders.
* Parallel VAE: the VAE's tiles are shared out over the ranks (`parallel.vae`).
* `--shard-weights`: the transformer's blocks sharded with FSDP2 over the same ranks (`parallel.sharding`).

The pipelines know nothing of ranks: they receive embeddings and a VAE that happens to split its tiles.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from ..parallel.encoders import MAIN_ONLY_ENCODERS, compute_on_main
from .tasks import TASKS


def world_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def drop_main_only_encoders(pipe) -> None:
    """Remove the encoders that only rank 0 runs (`MAIN_ONLY_ENCODERS`) from `pipe` on the other ranks."""
    if world_info()[0] == 0:
        return
    for name in MAIN_ONLY_ENCODERS:
        if getattr(pipe, name, None) is not None:
            setattr(pipe, name, None)


def encoder_kwargs_to_skip(world: int, rank: int) -> dict:
    """`from_pretrained` arguments that keep rank > 0 from loading the main-only encoders at all."""
    return dict.fromkeys(MAIN_ONLY_ENCODERS) if world > 1 and rank > 0 else {}


@torch.no_grad()  # as inside the pipeline: no autograd graph, and the same kernels (hence the same embeddings)
def task_embeddings(
    pipe, task: str, prompt: str, negative_prompt: str | None, guidance_scale: float, **inputs
) -> dict:
    """The pipeline keyword arguments that replace its own encoder calls (computed here, on this rank), as the task
    defines them (`TaskSpec.embeddings`): UMT5 embeddings of the prompt (and negative prompt with guidance); for the
    avatar also the window prompt's, the portrait's CLIP tokens and the wav2vec2 features of `speech`. Equal to
    what the pipeline computes itself."""
    return TASKS[task].embeddings(pipe, prompt, negative_prompt, guidance_scale, **inputs)


def precomputed_embeddings(pipe, task: str, device: torch.device, **kwargs) -> dict:
    """`task_embeddings` on rank 0, broadcast to every rank (on `device`)."""
    return compute_on_main(lambda: task_embeddings(pipe, task, **kwargs), device)


def pipeline_text_kwargs(embeddings: dict) -> dict:
    """Call arguments for a pipeline given precomputed `embeddings` (its prompts become None)."""
    return {"prompt": None, "negative_prompt": None, **embeddings}


def parallelize(
    pipe,
    ulysses_degree: int = 1,
    ring_degree: int = 1,
    parallel_backend: str = "diffusers",
    shard_weights: bool = False,
    device: torch.device | None = None,
) -> None:
    """Under torchrun: split the transformer's tokens (context parallelism, unless already done: a reused
    pipeline), share the VAE's tiles over the ranks, and with `shard_weights` shard the transformer's blocks (FSDP2,
    onto `device`; the transformer must not have been moved there whole). `shard_weights` also works on one rank
    (one shard: the whole model; the same code path, for baselines)."""
    from ..parallel import enable_context_parallel, enable_xfuser_parallel
    from ..parallel.sharding import is_sharded, shard_transformer
    from ..parallel.vae import enable_parallel_vae

    _, world = world_info()
    if world > 1 and pipe.transformer._parallel_config is None:
        shard = enable_xfuser_parallel if parallel_backend == "xfuser" else enable_context_parallel
        shard(pipe.transformer, ulysses_degree, ring_degree)
    if shard_weights and not is_sharded(pipe.transformer):
        shard_transformer(pipe.transformer, device or pipe._execution_device)
    if world > 1:
        enable_parallel_vae(pipe)


def place_all_but_transformer(pipe, device: torch.device) -> None:
    """Move every component except the transformer to `device` (`--shard-weights` places the transformer as
    shards)."""
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module) and name != "transformer":
            component.to(device)


def muxed_audio(speech, output_audio: str) -> tuple[np.ndarray, int]:
    """The waveform the avatar's mp4 carries (the pipeline returns none when it gets `audio_embeds`)."""
    if output_audio == "original":
        return speech.source, speech.source_rate
    return speech.normalized, 16000
