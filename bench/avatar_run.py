#!/usr/bin/env python
"""A whole talking-avatar run, measured whole: one command per row, random weights at real size (UMT5-XXL, the 19B
avatar transformer, CLIP ViT-H/14, wav2vec2, the Wan2.1 VAE in fp32), resident on one GPU, written as the CLI writes
it (the mp4 grows window by window on a background thread, then becomes the normal mp4).

    # a whole 30-s 480P run per preset (one call each)
    PYTHONPATH=src python bench/avatar_run.py --preset default --json $OUT/avatar_480p_default.json
    PYTHONPATH=src python bench/avatar_run.py --preset compile --json $OUT/avatar_480p_compile.json
    PYTHONPATH=src python bench/avatar_run.py --preset fast --json $OUT/avatar_480p_fast.json
    # 720P: the keyframe clip and two windows (5.8 s of audio) per preset
    PYTHONPATH=src python bench/avatar_run.py --preset default --resolution 720P --seconds 5.8 --json ...

Per run (device-synchronised clock from the start of the call, after loading): `prepare_s` (checks, text / CLIP /
wav2vec2 encoders), each clip's seconds (the keyframe clip, then every window) with its parts: transformer steps,
VAE encode, VAE decode, colour matching, CLIP, uint8, the rest (`other_s`), and the seconds the loop waited for the
writer (`write_wait_s`); the writer thread's own seconds per window (`write_s`, overlapped with the next window);
`first_playable_s` (when the growing file first held a second of video), `total_s` (to the finished mp4),
`outside_transformer_share` per window, peak GPU memory, host RSS after each clip and its peak, and
`projected_200s_s` = prepare + keyframe clip + windows(200 s) x the median window. `--check-exact` (on by default)
checks on this device, at this size, that decoding only a window's kept latent frames and colour-matching only the
kept frames give the same bits as the whole (`exact_decode`, `exact_colour`) and times both decodes.

Presets: default (bf16 eager), compile (regional torch.compile), fast (the CLI's `--fast`: 8-bit attention, FP8
linears, compile; needs torchao and Triton). Writing needs PyAV (`write_*` are null without it). `--tiny --device
cpu` runs the tiny configs (CI: the script works; not a measurement).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import AVATAR_SIZES, real_components
from bench_transformer import add_run_arguments, device_name, sync, write_json

from skyreels_diffusers.app.tiny import tiny_components
from skyreels_diffusers.pipelines import pipeline_skyreels_v3_talking_avatar as avatar_module
from skyreels_diffusers.pipelines.audio_io import load_speech
from skyreels_diffusers.pipelines.pipeline_skyreels_v3_talking_avatar import (
    SkyReelsV3TalkingAvatarPipeline,
    plan_windows,
)
from skyreels_diffusers.pipelines.video_io import GrowingVideoWriter


PRESETS = ("default", "compile", "fast")
PARTS = ("transformer", "vae_encode", "vae_decode", "colour", "clip", "uint8")
PROJECTION_SECONDS = 200
TINY_SIZE = (32, 48)


def host_rss_gib() -> tuple[float, float]:
    """(resident set now, its peak) of this process in GiB, from /proc (0 where there is none)."""
    values = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, kib = line.split()[:2]
                values[name] = int(kib) / 2**20
    except OSError:
        return 0.0, 0.0
    return round(values.get("VmRSS:", 0.0), 3), round(values.get("VmHWM:", 0.0), 3)


class PartClock:
    """Device-synchronised seconds spent in each part of a window: the transformer's forwards (hooks), and the
    pipeline's VAE encode / decode, CLIP, uint8 and colour-matching calls (wrapped on this pipeline object and
    module only: instrumentation of this benchmark)."""

    def __init__(self, pipe, device: torch.device):
        self.device, self.spent = device, defaultdict(float)
        pipe.transformer.register_forward_pre_hook(lambda *_: self._enter("transformer"))
        pipe.transformer.register_forward_hook(lambda *_: self._leave("transformer"))
        for name, part in (
            ("encode_video", "vae_encode"),
            ("decode_latents", "vae_decode"),
            ("encode_image", "clip"),
            ("to_uint8", "uint8"),
        ):
            setattr(pipe, name, self.timed(getattr(pipe, name), part))
        avatar_module.match_colors = self.timed(avatar_module.match_colors, "colour")

    def _enter(self, part: str) -> None:
        sync(self.device)
        self.spent[part] -= time.perf_counter()

    def _leave(self, part: str) -> None:
        sync(self.device)
        self.spent[part] += time.perf_counter()

    def timed(self, fn, part: str):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            self._enter(part)
            try:
                return fn(*args, **kwargs)
            finally:
                self._leave(part)

        return wrapper

    def take(self) -> dict[str, float]:
        """The seconds per part since the last call."""
        spent = {part: self.spent.get(part, 0.0) for part in PARTS}
        self.spent.clear()
        return spent


class TimedWriter(GrowingVideoWriter):
    """The CLI's growing-mp4 writer, recording when each window was in the file and how long its thread took."""

    def __init__(self, *args, start: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.start, self.windows = start, []

    def _encode_window(self, state, frames):
        begin = time.perf_counter()
        super()._encode_window(state, frames)
        super()._mux_audio(state, self._audio_target(state))
        end = time.perf_counter()
        self.windows.append({"write_s": end - begin, "done_at_s": end - self.start, "frames": self.frames_written})


def attention_backend(args) -> str | None:
    """The attention backend of the compile / fast preset, as asked (None: `enable_fast_path`'s default, resolved on
    the machine: fa3 on Hopper with FA3, else cuDNN)."""
    if args.preset == "fast":
        from skyreels_diffusers.optimization import FAST_PRESET

        return args.attention_backend or FAST_PRESET["attention_backend"]
    return args.attention_backend


def build(args, device: torch.device):
    components = tiny_components("talking_avatar") if args.tiny else real_components("talking_avatar", device)
    pipe = SkyReelsV3TalkingAvatarPipeline(**components)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.to(device)
    pipe.set_progress_bar_config(disable=True)
    if args.preset != "default":
        from skyreels_diffusers.optimization import FAST_PRESET, enable_fast_path, quantize_transformer

        if args.preset == "fast":
            quantize_transformer(pipe.transformer, FAST_PRESET["quantize"])
        enable_fast_path(pipe, compile=True, attention_backend=attention_backend(args))
    return pipe


def inputs(height: int, width: int, seconds: float) -> dict:
    import PIL.Image

    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * 16000)) / 16000
    audio = (0.3 * np.sin(2 * np.pi * 200 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    portrait = PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return {"image": portrait, "audio": load_speech(audio, 16000), "height": height, "width": width}


@torch.no_grad()
def check_exact(pipe, height: int, width: int, device: torch.device) -> dict:
    """Decoding only a window's first 18 latent frames against the whole 21 (its first 69 frames), and colour
    matching the kept frames against matching all, on random latents at the run's size: same bits? (and both
    decodes' seconds)."""
    generator = torch.Generator(device).manual_seed(0)
    shape = (1, pipe.vae.config.z_dim, 21, height // 8, width // 8)
    latents = torch.randn(shape, generator=generator, device=device)
    sync(device)
    begin = time.perf_counter()
    whole = pipe.decode_latents.__wrapped__(latents)
    sync(device)
    middle = time.perf_counter()
    kept = pipe.decode_latents.__wrapped__(latents[:, :, :18])
    sync(device)
    end = time.perf_counter()
    frames = whole[0].transpose(0, 1)
    reference = frames[0]
    match = avatar_module.match_colors.__wrapped__
    return {
        "exact_decode": bool(torch.equal(whole[:, :, :69], kept)),
        "exact_colour": bool(torch.equal(match(frames, reference)[5:69], match(frames[5:69], reference))),
        "decode_21_latents_s": round(middle - begin, 3),
        "decode_18_latents_s": round(end - middle, 3),
    }


def run_whole_call(args, device: torch.device) -> dict:
    """`--api call`: the same run through `pipe(...)` (every frame in memory, then one mp4): host RSS to compare."""
    from skyreels_diffusers.pipelines.video_io import write_video

    height, width = args.size or (TINY_SIZE if args.tiny else AVATAR_SIZES[args.resolution])
    pipe = build(args, device)
    rss_before = host_rss_gib()[0]
    samples = []
    start = time.perf_counter()
    out = pipe(
        **inputs(height, width, args.seconds),
        prompt="a person talks",
        generator=torch.Generator(),
        callback_on_window_end=lambda *_: samples.append(host_rss_gib()[0]),
    )
    with tempfile.TemporaryDirectory() as folder:
        write_video(out.frames[0], Path(folder) / "run.mp4", fps=out.fps, audio=out.audio, audio_sample_rate=16000)
    return {
        "api": "call",
        "preset": args.preset,
        "size": [height, width],
        "audio_s": args.seconds,
        "frames": int(out.frames.shape[1]),
        "total_s": round(time.perf_counter() - start, 3),
        "host_rss_before_gib": rss_before,
        "host_rss_per_clip_gib": samples,
        "host_rss_peak_gib": host_rss_gib()[1],
    }


def run(args, device: torch.device) -> dict:
    height, width = args.size or (TINY_SIZE if args.tiny else AVATAR_SIZES[args.resolution])
    load_begin = time.perf_counter()
    pipe = build(args, device)
    load_s = time.perf_counter() - load_begin
    clock = PartClock(pipe, device)
    exact = check_exact(pipe, height, width, device) if args.check_exact else {}
    rss_before = host_rss_gib()[0]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    writes = importlib.util.find_spec("av") is not None
    sync(device)
    start = time.perf_counter()
    run_ = pipe.windows(**inputs(height, width, args.seconds), prompt="a person talks", generator=torch.Generator())
    sync(device)
    prepare_s = time.perf_counter() - start
    clock.take()
    with tempfile.TemporaryDirectory() as folder:
        writer = None
        if writes:
            writer = TimedWriter(
                Path(folder) / "run.partial.mp4",
                fps=run_.fps,
                audio=run_.audio,
                audio_sample_rate=run_.audio_sample_rate,
                start=start,
            )
        clips, last = [], time.perf_counter()
        for window in run_:
            sync(device)
            generated = time.perf_counter()
            if writer is not None and len(window.frames):
                writer.append(window.frames)
            now = time.perf_counter()
            parts = clock.take()
            seconds = now - last
            clips.append(
                {
                    "clip": window.index,
                    "s": round(seconds, 3),
                    **{f"{k}_s": round(v, 3) for k, v in parts.items()},
                    "other_s": round(generated - last - sum(parts.values()), 3),
                    "write_wait_s": round(now - generated, 3),
                    "outside_transformer_share": round(1 - parts["transformer"] / seconds, 4),
                    "frames": len(window.frames),
                    "host_rss_gib": host_rss_gib()[0],
                }
            )
            last = now
            print(json.dumps(clips[-1]), flush=True)
            if args.json:  # what a run cut short by a time limit still leaves behind
                write_json(str(Path(args.json).with_suffix(".partial.json")), {"load_s": load_s, "clips": clips})
        finish_s = None
        if writer is not None:
            finish_begin = time.perf_counter()
            writer.finish(Path(folder) / "run.mp4")
            finish_s = time.perf_counter() - finish_begin
    total_s = time.perf_counter() - start
    row = summarise(args, run_, clips, writer, exact, load_s, prepare_s, finish_s, total_s)
    return {"api": "windows", **row, "host_rss_before_gib": rss_before}


def summarise(args, run_, clips, writer, exact, load_s, prepare_s, finish_s, total_s) -> dict:
    windows = [c for c in clips if c["clip"] > 0]
    typical = statistics.median(c["s"] for c in windows) if windows else None
    projected_windows = len(plan_windows(PROJECTION_SECONDS * 25).starts)
    first_playable = None
    if writer is not None:
        first_playable = next((w["done_at_s"] for w in writer.windows if w["frames"] >= run_.fps), None)
    row = {
        "preset": args.preset,
        "attention_backend": attention_backend(args),
        "resolution": args.resolution,
        "size": [run_.height, run_.width],
        "audio_s": args.seconds,
        "frames": run_.num_frames,
        "windows": len(run_.plan.starts),
        "load_s": round(load_s, 1),
        "prepare_s": round(prepare_s, 3),
        "keyframe_clip_s": clips[0]["s"] if clips else None,
        "window_median_s": typical,
        "clips": clips,
        "write_s": [round(w["write_s"], 3) for w in writer.windows] if writer else None,
        "finish_mp4_s": None if finish_s is None else round(finish_s, 3),
        "first_playable_s": None if first_playable is None else round(first_playable, 3),
        "total_s": round(total_s, 3),
        "outside_transformer_share_median": (
            round(statistics.median(c["outside_transformer_share"] for c in windows), 4) if windows else None
        ),
        "projected_200s_windows": projected_windows,
        "projected_200s_s": (
            None if typical is None else round(prepare_s + clips[0]["s"] + projected_windows * typical, 1)
        ),
        "host_rss_peak_gib": host_rss_gib()[1],
        **exact,
    }
    if writer is None:
        row["write_note"] = "not measured: PyAV is not installed"
    return row


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default", choices=PRESETS)
    parser.add_argument("--resolution", default="480P", choices=list(AVATAR_SIZES))
    parser.add_argument(
        "--seconds", type=float, default=30.0, help="audio seconds (30: the keyframe clip + 12 windows)"
    )
    parser.add_argument("--check-exact", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--attention-backend",
        help="compile / fast presets: this attention backend instead of the preset's (compile: fa3 on Hopper with "
        "FA3, else cuDNN; fast: optimization.FAST_PRESET's)",
    )
    parser.add_argument(
        "--api",
        default="windows",
        choices=("windows", "call"),
        help="windows: the CLI's way (window by window into the growing mp4); call: pipe(...) then one mp4",
    )
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="frame size (default: the bucket)")
    add_run_arguments(parser)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.attention_backend and args.preset == "default":
        parser.error("--attention-backend applies to --preset compile or fast (default runs diffusers' attention)")
    device = torch.device(args.device)
    row = run(args, device) if args.api == "windows" else run_whole_call(args, device)
    row.update(
        peak_gpu_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else 0.0,
        device=device_name(device),
        torch=torch.__version__,
        date=time.strftime("%Y-%m-%d"),
    )
    write_json(args.json, row)
    print(json.dumps({k: v for k, v in row.items() if k != "clips"}))
    if "clips" in row:
        print_table(row)
    return 0


def print_table(row: dict) -> None:
    print("\n| clip | s | transformer | VAE enc | VAE dec | colour | CLIP | uint8 | other | wait writer | outside |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for c in row["clips"]:
        print(
            f"| {c['clip']} | {c['s']} | {c['transformer_s']} | {c['vae_encode_s']} | {c['vae_decode_s']} | "
            f"{c['colour_s']} | {c['clip_s']} | {c['uint8_s']} | {c['other_s']} | {c['write_wait_s']} | "
            f"{c['outside_transformer_share']:.1%} |"
        )


if __name__ == "__main__":
    raise SystemExit(main())
