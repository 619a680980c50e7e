"""Worker of the whole-run parallel tests: run under torchrun with 2 gloo processes (or alone, as the
one-process reference); writes `whole_<rank>.pt` with everything the tests compare.

* parallel VAE: tiled decode and encode of a tiny Wan VAE with the tiles split over the ranks, and the one-rank
  tiled results of diffusers' own `AutoencoderKLWan` on the same weights (computed here, on every rank);
* encoders once: the embeddings every rank receives (rank 1 has no text or audio encoder);
* weight sharding: transformer outputs with FSDP2-sharded blocks (alone and with Ulysses), the unsharded output on
  the same weights, and each rank's local parameter bytes.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import torch.distributed as dist


TILES = {
    "tile_sample_min_height": 64,
    "tile_sample_min_width": 64,
    "tile_sample_stride_height": 48,
    "tile_sample_stride_width": 48,
}


def portrait():
    import PIL.Image

    pixels = np.random.default_rng(4).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def waveform(seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def embedding_kwargs(task: str) -> dict:
    """The inputs whose embeddings are compared (guidance on: the negative prompt is encoded too)."""
    from skyreels_diffusers.pipelines.audio_io import load_speech

    kwargs = {"prompt": "a dog runs", "negative_prompt": None, "guidance_scale": 3.0}
    if task == "talking_avatar":
        kwargs.update(
            window_prompt="a person is talking",
            portrait=portrait(),
            height=32,
            width=48,
            speech=load_speech(waveform(), 16000),
        )
    return kwargs


def vae_outputs() -> dict:
    from skyreels_diffusers.app.tiny import tiny_vae
    from skyreels_diffusers.parallel.vae import ParallelAutoencoderKLWan

    vae = tiny_vae(seed=3)
    vae.enable_tiling(**TILES)
    parallel = ParallelAutoencoderKLWan.from_vae(vae)
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(1, 16, 3, 14, 22, generator=g)  # 112 x 176 px: 3 x 4 tiles (edge tiles narrower)
    pixels = torch.rand(1, 3, 5, 104, 152, generator=g) * 2 - 1
    with torch.no_grad():
        out = {
            "vae.decode.parallel": parallel.decode(latents).sample,
            "vae.decode.one_rank": vae.decode(latents).sample,
            "vae.encode.parallel": parallel.encode(pixels).latent_dist.mode(),
            "vae.encode.one_rank": vae.encode(pixels).latent_dist.mode(),
            "vae.shares_weights": torch.tensor(
                parallel.decoder.conv_in.weight.data_ptr() == vae.decoder.conv_in.weight.data_ptr()
            ),
        }
    return out


def embeddings() -> dict:
    from skyreels_diffusers.app.distributed import drop_main_only_encoders, precomputed_embeddings
    from skyreels_diffusers.app.tiny import tiny_pipeline

    out = {}
    for task in ("reference_to_video", "talking_avatar"):
        pipe = tiny_pipeline(task, seed=0)
        drop_main_only_encoders(pipe)
        out[f"{task}.has_text_encoder"] = torch.tensor(pipe.text_encoder is not None)
        if task == "talking_avatar":
            out[f"{task}.has_audio_encoder"] = torch.tensor(pipe.audio_encoder is not None)
        with torch.no_grad():
            received = precomputed_embeddings(pipe, task, torch.device("cpu"), **embedding_kwargs(task))
        out.update({f"{task}.{name}": value for name, value in received.items()})
    return out


def sharded_outputs() -> dict:
    from skyreels_diffusers.parallel import enable_context_parallel
    from skyreels_diffusers.parallel.sharding import is_sharded, local_parameter_bytes, shard_transformer
    from tests.helpers import tiny_inputs, tiny_transformer

    out = {}
    for variant, ulysses in (("reference", 1), ("extension", 2), ("avatar", 2)):
        model = tiny_transformer(variant, seed=7)
        inputs = tiny_inputs(model, variant, frames=4, height=8, width=12, seed=1)
        with torch.no_grad():
            out[f"{variant}.unsharded"] = model(**inputs).sample
        if ulysses > 1:
            enable_context_parallel(model, ulysses_degree=ulysses)
        shard_transformer(model, torch.device("cpu"))
        with torch.no_grad():
            out[f"{variant}.sharded"] = model(**inputs).sample
        out[f"{variant}.local_bytes"] = torch.tensor(local_parameter_bytes(model))
    # bf16 weights with the fp32 `_keep_in_fp32_modules` (as loaded): FSDP2 units of mixed dtypes
    model = tiny_transformer("avatar", seed=7).to(torch.bfloat16)
    keep = set(model._keep_in_fp32_modules)
    for name, param in model.named_parameters():
        if keep & set(name.split(".")):
            param.data = param.data.float()
    inputs = tiny_inputs(model, "avatar", frames=3, height=4, width=6, seed=1)
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() and k != "timestep" else v for k, v in inputs.items()}
    with torch.no_grad():
        out["avatar_bf16.unsharded"] = model(**inputs).sample
        # units of their own for the fp32 time embedding and projection (their size at 14B; tiny here)
        shard_transformer(model, torch.device("cpu"), min_unit_numel=1000)
        out["avatar_bf16.fp32_units"] = torch.tensor(
            sum(1 for name, m in model.named_modules() if name.startswith("condition_embedder") and is_sharded(m))
        )
        out["avatar_bf16.sharded"] = model(**inputs).sample
    out.update(meta_sharded())
    return out


def meta_sharded() -> dict:
    """Built on the meta device (bf16 with fp32 modules), sharded, then materialised with `to_empty` and filled:
    the path `bench/bench_e2e.py` takes for real-size models (no rank holds the whole model)."""
    from skyreels_diffusers.models import SkyReelsV3Transformer3DModel
    from skyreels_diffusers.models.configs import TINY_TRANSFORMER_CONFIGS
    from skyreels_diffusers.parallel.sharding import local_parameter_bytes, shard_transformer
    from tests.helpers import tiny_inputs

    with torch.device("meta"):
        model = SkyReelsV3Transformer3DModel(**TINY_TRANSFORMER_CONFIGS["avatar"]).to(torch.bfloat16)
    keep = set(model._keep_in_fp32_modules)
    for name, param in model.named_parameters():
        if keep & set(name.split(".")):
            param.data = param.data.float()
    shard_transformer(model, torch.device("cpu"), min_unit_numel=1000)
    model.to_empty(device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            local.copy_(torch.randn(local.shape, generator=generator) * 0.02)
        inputs = tiny_inputs(model, "avatar", frames=3, height=4, width=6, seed=1)
        inputs = {
            k: v.to(torch.bfloat16) if v.is_floating_point() and k != "timestep" else v for k, v in inputs.items()
        }
        return {"meta.output": model(**inputs).sample, "meta.local_bytes": torch.tensor(local_parameter_bytes(model))}


def main(out_dir: str) -> None:
    parallel = "WORLD_SIZE" in os.environ
    if parallel:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    np.random.seed(0)
    outputs = {**vae_outputs(), **embeddings()}
    if parallel:
        outputs.update(sharded_outputs())
    rank = dist.get_rank() if parallel else "single"
    torch.save(outputs, os.path.join(out_dir, f"whole_{rank}.pt"))
    if parallel:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
