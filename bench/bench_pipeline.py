#!/usr/bin/env python
"""Whole-pipeline time and peak GPU memory of one real-size run per task, with random weights (real architectures:
UMT5-XXL encoder, Wan2.1 VAE, the 14B/19B transformer, CLIP ViT-H/14, wav2vec2-base), per component.

    PYTHONPATH=src python bench/bench_pipeline.py --tasks reference_to_video --resolution 480P \
        --modes resident offload low_vram --json pipeline.json

Per run: total seconds, seconds inside each component's forward (text encoder, image/audio encoder, transformer,
VAE), the share of everything but the transformer, and peak GPU memory. `--tiny --device cpu` checks the script.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_transformer import add_run_arguments, device_name, sync, write_json

from skyreels_diffusers.app.tasks import TASKS
from skyreels_diffusers.app.tiny import avatar_feature_extractor, tiny_components, tiny_tokenizer
from skyreels_diffusers.models import SkyReelsV3Transformer3DModel
from skyreels_diffusers.models.configs import TRANSFORMER_CONFIGS
from skyreels_diffusers.optimization import apply_memory_mode


SIZES = {"480P": (480, 848), "540P": (544, 960), "720P": (720, 1280)}
AVATAR_SIZES = {"480P": (480, 832), "540P": (544, 960), "720P": (720, 1280)}


#: the real components' sizes (random weights): UMT5-XXL encoder, CLIP ViT-H/14 vision tower, wav2vec2-base, the
#: Wan2.1 VAE (diffusers' defaults); the transformer's come from `TRANSFORMER_CONFIGS` by variant
REAL_SIZES = {
    "text_encoder": dict(
        vocab_size=256384,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    ),
    "image_encoder": dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        hidden_act="gelu",
    ),
    "audio_encoder": {},
    "vae": {},
}
#: one seed per component: under torchrun rank 0 alone builds the text and audio encoders, and a component seeded
#: after them would get other random weights on the other ranks (each rank a different model)
COMPONENT_SEEDS = {"text_encoder": 1, "transformer": 2, "image_encoder": 3, "vae": 4, "audio_encoder": 5}


def real_components(
    task: str, device, main_encoders: bool = True, transformer: bool = True, sizes: dict | None = None
) -> dict:
    """Random weights at real size, built on `device` in bf16 (VAE and wav2vec2 in fp32, as the pipelines use them).
    `main_encoders=False` leaves out the text and audio encoders (ranks > 0 under torchrun: rank 0 encodes);
    `transformer=False` leaves out the transformer (the caller builds it, e.g. sharded from the meta device);
    `sizes` replaces `REAL_SIZES` (and, under "transformer", the transformer's config) for tests."""
    from diffusers import AutoencoderKLWan
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        UMT5Config,
        UMT5EncoderModel,
        Wav2Vec2Config,
        Wav2Vec2Model,
    )

    sizes = {**REAL_SIZES, "transformer": TRANSFORMER_CONFIGS[TASKS[task].variant], **(sizes or {})}

    def seeded(name: str, build):
        torch.manual_seed(COMPONENT_SEEDS[name])  # the same weights whatever this process built before
        return build().eval()

    previous = torch.get_default_dtype()
    with torch.device(device):
        torch.set_default_dtype(torch.bfloat16)
        try:
            components = {
                "tokenizer": tiny_tokenizer(),  # ids < 259: any real-vocab embedding row works
                "text_encoder": seeded("text_encoder", lambda: UMT5EncoderModel(UMT5Config(**sizes["text_encoder"])))
                if main_encoders
                else None,
            }
            if transformer:
                components["transformer"] = seeded(
                    "transformer", lambda: SkyReelsV3Transformer3DModel(**sizes["transformer"])
                )
            if task == "talking_avatar":
                components["image_encoder"] = seeded(
                    "image_encoder", lambda: CLIPVisionModel(CLIPVisionConfig(**sizes["image_encoder"]))
                )
        finally:
            torch.set_default_dtype(previous)
        components["vae"] = seeded("vae", lambda: AutoencoderKLWan(**sizes["vae"]))
        if task == "talking_avatar":
            components["audio_encoder"] = (
                seeded("audio_encoder", lambda: Wav2Vec2Model(Wav2Vec2Config(**sizes["audio_encoder"])))
                if main_encoders
                else None
            )
            components["feature_extractor"] = avatar_feature_extractor()
    if transformer:
        keep = set(components["transformer"]._keep_in_fp32_modules)
        for name, param in components["transformer"].named_parameters():
            if keep & set(name.split(".")):
                param.data = param.data.float()
    components["scheduler"] = TASKS[task].make_scheduler()
    return {k: (v.requires_grad_(False) if isinstance(v, torch.nn.Module) else v) for k, v in components.items()}


def time_components(pipe, device) -> dict:
    """Accumulate seconds spent in each component's forward (device-synchronised forward hooks; the VAE through its
    encoder and decoder modules, which its encode/decode call chunk by chunk)."""
    spent = defaultdict(float)
    modules = {
        name: getattr(pipe, name, None) for name in ("text_encoder", "image_encoder", "audio_encoder", "transformer")
    }
    modules.update(vae_encoder=pipe.vae.encoder, vae_decoder=pipe.vae.decoder)
    if modules.get("audio_encoder") is not None:  # the pipeline runs wav2vec2's parts, not its forward
        modules["audio_encoder"] = modules["audio_encoder"].encoder
    for name, module in modules.items():
        if module is None:
            continue

        def pre(mod, args, _name=name):
            sync(device)
            spent[_name] -= time.perf_counter()

        def post(mod, args, output, _name=name):
            sync(device)
            spent[_name] += time.perf_counter()

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)
    return spent


def run_task(pipe, task: str, height: int, width: int, seconds: int, steps: int | None) -> int:
    rng = np.random.default_rng(0)
    generator = torch.Generator().manual_seed(0)
    common = dict(prompt="a person walks", height=height, width=width, generator=generator, output_type="np")
    if steps:
        common["num_inference_steps"] = steps
    if task == "reference_to_video":
        import PIL.Image

        image = PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        return pipe(ref_images=[image, image], num_frames=24 * seconds + 1, **common).frames.shape[1]
    if task == "talking_avatar":
        import PIL.Image

        image = PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        t = np.arange(int(seconds * 16000)) / 16000
        audio = (0.3 * np.sin(2 * np.pi * 200 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
        return pipe(image=image, audio=audio, audio_sample_rate=16000, **common).frames.shape[1]
    video = rng.integers(0, 256, (40, height, width, 3), dtype=np.uint8)
    return pipe(video=video, duration=seconds, **common).frames.shape[1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--resolution", default="480P", choices=sorted(SIZES))
    parser.add_argument(
        "--modes", nargs="+", default=["resident"], choices=["resident", "offload", "group", "low_vram"]
    )
    parser.add_argument("--seconds", type=int, default=None, help="duration (default: 5, shot switching 2, avatar 3)")
    parser.add_argument("--steps", type=int, default=None)
    add_run_arguments(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for task in args.tasks:
        for mode in args.modes:
            height, width = (AVATAR_SIZES if task == "talking_avatar" else SIZES)[args.resolution]
            if args.tiny:
                height, width = 32, 48
            seconds = args.seconds or {"shot_switching_extension": 2, "talking_avatar": 3}.get(task, 5)
            components = tiny_components(task) if args.tiny else real_components(task, device)
            if mode != "resident":  # offload modes start from CPU-resident weights (built on the GPU: faster)
                for component in components.values():
                    if isinstance(component, torch.nn.Module):
                        component.to("cpu")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            pipe = TASKS[task].pipeline_class(**components)
            pipe.set_progress_bar_config(disable=True)
            apply_memory_mode(pipe, mode, device)
            spent = time_components(pipe, device)
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            frames = run_task(pipe, task, height, width, seconds, args.steps)
            sync(device)
            total = time.perf_counter() - start
            transformer = spent.get("transformer", 0.0)
            row = dict(
                task=task,
                mode=mode,
                resolution=args.resolution,
                size=[height, width],
                seconds=seconds,
                frames=int(frames),
                total_s=round(total, 2),
                component_s={k: round(v, 2) for k, v in spent.items()},
                outside_transformer_share=round(1 - transformer / total, 4) if total else None,
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else 0.0,
                device=device_name(device),
                date=time.strftime("%Y-%m-%d"),
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_json(args.json, rows)
            del pipe, components, spent
            gc.collect()  # the timing hooks form reference cycles: free the previous pipeline before the next
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
