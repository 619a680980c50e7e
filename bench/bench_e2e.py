#!/usr/bin/env python
"""End to end: one whole generation per case with random weights at real size, on N GPUs under torchrun (N = 1 is
the baseline), through the same request-layer steps as `skyreels-v3 generate` under torchrun: encoders once on
rank 0 (broadcast), context parallelism over the ranks, the parallel VAE, optionally `--shard-weights` (FSDP2).

    # one GPU (baseline)
    PYTHONPATH=src python bench/bench_e2e.py --cases reference_720p avatar_480p --json e2e_1gpu.json
    # four GPUs, Ulysses over all of them, weights sharded
    PYTHONPATH=src torchrun --nproc_per_node 4 bench/bench_e2e.py --cases reference_720p --shard-weights \\
        --json e2e_4gpu.json

Cases: reference_720p (5 s, 121 frames, 8 steps), extension_720p (5 s: one chunk of 7 + 33 latent frames, 8
steps), avatar_480p / avatar_720p (keyframe clip + windows of 81 frames, 4 steps each; `--avatar-seconds` of audio,
default 4 s = 2 windows). Presets: default (bf16 eager), compile (regional torch.compile), fp8 (torchao FP8
weight-only, eager), fp8_compile (FP8 dynamic activations + compile), fast (`--fast`: `optimization.FAST_PRESET`,
8-bit self-attention + FP8 dynamic + compile).

Per run (rank 0's clock; every stage is device-synchronised): encoders (rank 0 + broadcast), the time before the
first step (inputs, VAE encode), every transformer forward (= step, no CFG), the decode after the last step (VAE
decode + gather + postprocess), writing the mp4 (rank 0), total; VAE encoder/decoder compute (this rank's tiles);
peak GPU memory of every rank. `--steps` fewer than the default also gives `projected_total_s`: the measured run
with its steps replaced by the default count of the median step (the first step excluded when there are others).
Avatar: keyframe clip, each window, and `projected_200s_s` = encoders + keyframe + windows(200 s) x the mean window.
Under torchrun the VAE always tiles (its tiles are what the ranks share); `--vae-tiling` tiles on one GPU too, so
that `--save-frames DIR` (uint8 frames per run, and the max / mean difference from the case's `*_1gpu.npy` there)
compares like with like. `--tiny --device cpu` runs it on the tiny configs (CI: the script works; not a
measurement).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import real_components, time_components
from bench_transformer import add_run_arguments, device_name, sync, write_json

from skyreels_diffusers.app.distributed import (
    muxed_audio,
    parallelize,
    pipeline_text_kwargs,
    precomputed_embeddings,
)
from skyreels_diffusers.app.tasks import TASKS
from skyreels_diffusers.app.tiny import tiny_components


# case: (task, (height, width), seconds); the steps and the video's length are the task's defaults (the registry's)
CASES = {
    "reference_720p": ("reference_to_video", (720, 1280), TASKS["reference_to_video"].defaults.duration),
    "extension_720p": ("single_shot_extension", (720, 1280), TASKS["single_shot_extension"].defaults.duration),
    "avatar_480p": ("talking_avatar", (480, 832), 4),  # seconds of audio
    "avatar_720p": ("talking_avatar", (720, 1280), 4),
}
PRESETS = ("default", "compile", "fp8", "fp8_compile", "fast")
TINY_SIZE = (32, 48)
AVATAR_PROJECTION_SECONDS = 200


def init(device_arg: str, shard_weights: bool) -> tuple[int, int, torch.device]:
    """torchrun's process group (also for one process with `--shard-weights`: FSDP needs one)."""
    import os

    from skyreels_diffusers.parallel import init_distributed

    rank, world, device = init_distributed()
    if device_arg == "cpu":
        device = torch.device("cpu")
    if shard_weights and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise SystemExit("--shard-weights: run under torchrun (even with --nproc_per_node 1)")
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def sharded_random_transformer(variant: str, device: torch.device, tiny: bool):
    """The transformer built on the meta device, sharded (FSDP2), then materialised shard by shard on `device` and
    filled with cheap random values (no rank ever holds the whole model)."""
    from skyreels_diffusers.models import SkyReelsV3Transformer3DModel
    from skyreels_diffusers.models.configs import TINY_TRANSFORMER_CONFIGS, TRANSFORMER_CONFIGS
    from skyreels_diffusers.parallel.sharding import shard_transformer

    cfg = (TINY_TRANSFORMER_CONFIGS if tiny else TRANSFORMER_CONFIGS)[variant]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32 if tiny else torch.bfloat16)
    try:
        with torch.device("meta"):
            model = SkyReelsV3Transformer3DModel(**cfg)
    finally:
        torch.set_default_dtype(previous)
    keep = set(model._keep_in_fp32_modules)
    for name, param in model.named_parameters():
        if keep & set(name.split(".")):
            param.data = param.data.float()
    shard_transformer(model, device)
    model.to_empty(device=device)
    fill_random(model)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def fill_random(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (nn.Linear's range), norm weights 1, biases 0. Each parameter is
    drawn whole from a generator of its own (`seed` and its name) and a sharded one keeps its own rows of it, so the
    model is the same on one GPU, on every rank and with `--shard-weights` over any number of ranks: the frames of
    all these runs compare."""
    from torch.distributed.tensor import DTensor

    for name, param in model.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        if name.endswith("bias"):
            local.zero_()
            continue
        if param.dim() == 1:
            local.fill_(1.0)
            continue
        generator = torch.Generator(device=local.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        bound = 1 / math.sqrt(math.prod(param.shape[1:]))  # fan-in
        whole = torch.empty(param.shape, dtype=local.dtype, device=local.device)
        whole.uniform_(-bound, bound, generator=generator)
        start = shard_offset(param) if isinstance(param, DTensor) else 0
        local.copy_(whole.narrow(0, start, local.shape[0]))


def shard_offset(param) -> int:
    """The first row of this rank's FSDP2 shard of `param` (dim-0 shards of `ceil(rows / ranks)` rows)."""
    from torch.distributed.tensor import Shard

    (placement,) = param.placements
    assert placement == Shard(0), f"unexpected placement {placement}"
    rows, ranks = param.shape[0], param.device_mesh.size()
    return min(rows, param.device_mesh.get_local_rank() * -(-rows // ranks))


def build_pipeline(task: str, device: torch.device, tiny: bool, shard: bool, main: bool):
    variant = TASKS[task].variant
    if tiny:
        components = tiny_components(task)
        if not main:
            components.update(text_encoder=None, **({"audio_encoder": None} if "audio_encoder" in components else {}))
        if shard:
            components["transformer"] = sharded_random_transformer(variant, device, tiny=True)
    else:
        components = real_components(task, device, main_encoders=main, transformer=not shard)
        if shard:
            components["transformer"] = sharded_random_transformer(variant, device, tiny=False)
    if not shard:  # the values the sharded build gets (`fill_random`): every kind of run has the same model
        fill_random(components["transformer"].to(device))
    pipe = TASKS[task].pipeline_class(**components)
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module) and not (shard and name == "transformer"):
            component.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def apply_preset(pipe, preset: str) -> None:
    from skyreels_diffusers.optimization import FAST_PRESET, enable_fast_path, quantize_transformer

    if preset == "fast":  # what `skyreels-v3 generate --fast` applies
        quantize_transformer(pipe.transformer, FAST_PRESET["quantize"])
        enable_fast_path(pipe, compile=FAST_PRESET["compile"], attention_backend=FAST_PRESET["attention_backend"])
        return
    if preset in ("fp8", "fp8_compile"):
        quantize_transformer(pipe.transformer, "fp8_weight_only" if preset == "fp8" else "fp8_dynamic")
    enable_fast_path(pipe, compile=preset in ("compile", "fp8_compile"))


class Clock:
    """Device-synchronised timestamps (seconds since `start`) and the duration of every transformer forward."""

    def __init__(self, pipe, device: torch.device):
        self.device, self.marks, self.forwards, self._begin = device, {}, [], None
        pipe.transformer.register_forward_pre_hook(self._pre)
        pipe.transformer.register_forward_hook(self._post)
        self.start = self.now()

    def now(self) -> float:
        sync(self.device)
        return time.perf_counter()

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, []).append(self.now() - self.start)

    def _pre(self, module, args):
        self._begin = self.now()
        self.marks.setdefault("forward_start", []).append(self._begin - self.start)

    def _post(self, module, args, output):
        self.forwards.append(self.now() - self._begin)
        self.marks.setdefault("forward_end", []).append(self.now() - self.start)


def make_inputs(task: str, height: int, width: int, seconds: float, tiny: bool) -> dict:
    rng = np.random.default_rng(0)
    if task == "reference_to_video":
        import PIL.Image

        image = PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        return {"ref_images": [image, image], "num_frames": (4 if tiny else 24 * int(seconds)) + 1}
    if task == "talking_avatar":
        import PIL.Image

        from skyreels_diffusers.pipelines.audio_io import load_speech

        t = np.arange(int(seconds * 16000)) / 16000
        audio = (0.3 * np.sin(2 * np.pi * 200 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
        portrait = PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        return {"image": portrait, "speech": load_speech(audio, 16000)}
    return {"video": rng.integers(0, 256, (40, height, width, 3), dtype=np.uint8), "duration": int(seconds)}


def run_case(
    pipe,
    task: str,
    size: tuple[int, int],
    seconds: float,
    steps: int,
    device,
    tiny: bool,
    frames_file: Path | None = None,
) -> dict:
    """One whole run: encoders once, the pipeline, writing (rank 0); returns the timings (rank 0's clock)."""
    from skyreels_diffusers.pipelines.video_io import write_video

    height, width = size
    inputs = make_inputs(task, height, width, seconds, tiny)
    vae_spent = time_components(pipe, device)
    clock = Clock(pipe, device)
    avatar = task == "talking_avatar"
    embeddings = precomputed_embeddings(
        pipe,
        task,
        device,
        prompt="a person walks through a market",
        negative_prompt=None,
        guidance_scale=1.0,
        window_prompt="a person is talking" if avatar else None,
        portrait=inputs.get("image"),
        speech=inputs.get("speech"),
        height=height,
        width=width,
    )
    clock.mark("encoded")
    common = {
        **pipeline_text_kwargs(embeddings),
        "height": height,
        "width": width,
        "num_inference_steps": steps,
        "generator": torch.Generator().manual_seed(0),
        "output_type": "np",
    }
    if avatar:
        speech = inputs.pop("speech")
        out = pipe(
            image=inputs["image"], window_prompt=None, callback_on_window_end=lambda *a: clock.mark("window"), **common
        )
        frames, (audio, rate) = out.frames[0], muxed_audio(speech, "original")
    else:
        frames, audio, rate = pipe(**inputs, **common).frames[0], None, None
    clock.mark("generated")
    if dist.is_initialized():
        dist.barrier()
    writes = importlib.util.find_spec("av") is not None  # PyAV: absent on some GPU images
    if writes and (not dist.is_initialized() or dist.get_rank() == 0):
        with tempfile.TemporaryDirectory() as folder:
            write_video(
                np.asarray(frames),
                Path(folder) / "out.mp4",
                fps=25 if avatar else 24,
                audio=audio,
                audio_sample_rate=rate,
            )
    clock.mark("written")
    row = summarise(clock, vae_spent, task, steps, len(frames))
    if frames_file is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        row.update(compare_frames(np.asarray(frames), frames_file))
    if not writes:
        row.update(write_s=None, write_note="not measured: PyAV is not installed")
    return row


def compare_frames(frames: np.ndarray, path: Path) -> dict:
    """Save the frames (uint8) to `path`; against the one-GPU file of the same case beside it (`*_1gpu.npy`), the
    max and mean absolute difference in uint8 levels (every run has the same seed and the same random weights, with
    or without `--shard-weights`; compare runs whose VAE tiles alike: `--vae-tiling` on one GPU)."""
    pixels = np.clip(np.rint(frames * 255), 0, 255).astype(np.uint8)
    np.save(path, pixels)
    reference = path.with_name(path.name.rsplit("_", 1)[0] + "_1gpu.npy")
    if reference == path or not reference.is_file():
        return {}
    diff = np.abs(pixels.astype(np.int16) - np.load(reference).astype(np.int16))
    return {"max_abs_diff_vs_1gpu": int(diff.max()), "mean_abs_diff_vs_1gpu": round(float(diff.mean()), 4)}


def summarise(clock: Clock, vae_spent: dict, task: str, steps: int, frames: int) -> dict:
    marks, forwards = clock.marks, clock.forwards
    encoded, generated, written = marks["encoded"][0], marks["generated"][0], marks["written"][0]
    row = {
        "frames": frames,
        "steps": steps,
        "encoders_s": encoded,
        "before_first_step_s": marks["forward_start"][0] - encoded,
        "step_s": forwards,
        "after_last_step_s": generated - marks["forward_end"][-1],
        "vae_encode_compute_s": vae_spent.get("vae_encoder", 0.0),
        "vae_decode_compute_s": vae_spent.get("vae_decoder", 0.0),
        "write_s": written - generated,
        "total_s": written,
    }
    if task == "talking_avatar":
        from skyreels_diffusers.pipelines.pipeline_skyreels_v3_talking_avatar import plan_windows

        ends = [encoded, *marks["window"]]
        row["keyframe_s"] = ends[1] - ends[0]
        row["window_s"] = [b - a for a, b in itertools.pairwise(ends[1:])]
        windows = len(plan_windows(AVATAR_PROJECTION_SECONDS * 25).starts)
        if row["window_s"]:
            row["windows_200s"] = windows
            row["projected_200s_s"] = encoded + row["keyframe_s"] + windows * statistics.mean(row["window_s"])
    return {
        k: [round(x, 3) for x in v] if isinstance(v, list) else round(v, 3) if isinstance(v, float) else v
        for k, v in row.items()
    }


def project(row: dict, default_steps: int) -> None:
    """`projected_total_s`: the run with `default_steps` steps of the median measured step (per clip for the
    avatar); only when fewer steps than the default ran."""
    steps = row["step_s"]
    if row["steps"] >= default_steps or not steps:
        return
    typical = statistics.median(steps[1:] if len(steps) > 1 else steps)
    clips = max(1, len(steps) // row["steps"])
    row["projected_total_s"] = round(row["total_s"] - sum(steps) + clips * default_steps * typical, 2)
    if "projected_200s_s" in row:
        extra = (default_steps - row["steps"]) * typical
        row["projected_200s_s"] = round(row["projected_200s_s"] + (1 + row["windows_200s"]) * extra, 2)


def frames_file(args, case: str, preset: str, world: int) -> Path | None:
    if args.save_frames is None:
        return None
    Path(args.save_frames).mkdir(parents=True, exist_ok=True)
    return Path(args.save_frames) / f"{case}_{preset}{'_tiny' if args.tiny else ''}_{world}gpu.npy"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--presets", nargs="+", default=["default"], choices=PRESETS)
    parser.add_argument("--steps", type=int, default=None, help="steps per clip (default: the case's)")
    parser.add_argument(
        "--avatar-seconds",
        type=float,
        default=None,
        help="avatar audio seconds (default 4: keyframe clip + 2 windows)",
    )
    parser.add_argument("--ulysses-degree", type=int, default=None, help="default: all processes")
    parser.add_argument("--ring-degree", type=int, default=1)
    parser.add_argument("--shard-weights", action="store_true", help="FSDP2 over the processes (needs torchrun)")
    parser.add_argument(
        "--vae-tiling",
        action="store_true",
        help="tiled VAE on one GPU too (the parallel VAE always tiles: same tiles, same output)",
    )
    parser.add_argument(
        "--save-frames",
        default=None,
        metavar="DIR",
        help="save each run's frames (uint8 .npy) and compare with the 1-GPU file of the case there",
    )
    add_run_arguments(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    rank, world, device = init(args.device, args.shard_weights)
    ulysses = args.ulysses_degree or world // args.ring_degree
    rows = []
    for case in args.cases:
        task, size, seconds = CASES[case]
        default_steps = TASKS[task].defaults.steps
        if task == "talking_avatar" and args.avatar_seconds:
            seconds = args.avatar_seconds
        size = TINY_SIZE if args.tiny else size
        steps = args.steps or default_steps
        for preset in args.presets:
            head = {
                "case": case,
                "preset": preset,
                "gpus": world,
                "ulysses": ulysses,
                "ring": args.ring_degree,
                "shard_weights": args.shard_weights,
                "vae_tiling": args.vae_tiling or world > 1,
                "size": list(size),
                "seconds": seconds,
            }
            pipe = None
            try:  # a case that cannot run here (every rank fails alike) is recorded, not fatal
                start = time.perf_counter()
                pipe = build_pipeline(task, device, args.tiny, args.shard_weights, main=rank == 0)
                apply_preset(pipe, preset)
                parallelize(pipe, ulysses, args.ring_degree, shard_weights=False, device=device)
                if args.vae_tiling:
                    pipe.vae.enable_tiling()
                built = time.perf_counter() - start
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                target = frames_file(args, case, preset, world)
                row = {
                    **head,
                    "build_s": round(built, 1),
                    **run_case(pipe, task, size, seconds, steps, device, args.tiny, target),
                }
                project(row, default_steps)
            except Exception as error:  # noqa: BLE001
                traceback.print_exc()
                row = {**head, "error": f"{type(error).__name__}: {str(error)[:300]}"}
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
            peaks = [peak] * world
            if dist.is_initialized():
                dist.all_gather_object(peaks, peak)
            row.update(
                peak_gib_per_rank=[round(p, 2) for p in peaks],
                device=device_name(device),
                torch=torch.__version__,
                date=time.strftime("%Y-%m-%d"),
            )
            if rank == 0:
                rows.append(row)
                print(json.dumps(row), flush=True)
                write_json(args.json, rows)
            pipe = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if rank == 0:
        print_table(rows)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def print_table(rows: list[dict]) -> None:
    print(
        "\n| case | preset | GPUs | shard | total s | encoders s | before steps s | steps s | after steps s | "
        "write s | projected s | peak GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['case']} | {r['preset']} | {r['gpus']} | {r['shard_weights']} | failed: {r['error'][:90]} |")
            continue
        projected = r.get("projected_200s_s", r.get("projected_total_s", "-"))
        print(
            f"| {r['case']} | {r['preset']} | {r['gpus']} | {r['shard_weights']} | {r['total_s']} | "
            f"{r['encoders_s']} | {r['before_first_step_s']} | {sum(r['step_s']):.2f} ({len(r['step_s'])}) | "
            f"{r['after_last_step_s']} | {r['write_s']} | {projected} | {max(r['peak_gib_per_rank'])} |"
        )


if __name__ == "__main__":
    raise SystemExit(main())
