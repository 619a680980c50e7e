#!/usr/bin/env python
"""kijai / ComfyUI FP8-scaled files at real size: load time, GPU memory, ms per step and output error against bf16
and the FP8 presets (part `transformer`), and the whole `--low-vram` talking avatar at 480P with an FP8-scaled
transformer and an FP8-scaled UMT5 text encoder against the bf16 components under the same preset (part `pipeline`).

    # A2V transformer, full size (40 blocks), 480P and 720P (~6 min on an H100; ~55 GB of disk under --folder)
    PYTHONPATH=src:. python bench/bench_fp8_scaled.py --parts transformer --cases avatar:480P avatar:720P \
        --bf16-file --json $OUT/fp8_scaled_a2v.json
    # R2V transformer (~5 min, ~42 GB of disk)
    PYTHONPATH=src:. python bench/bench_fp8_scaled.py --parts transformer --cases reference:480P reference:720P \
        --bf16-file --json $OUT/fp8_scaled_r2v.json
    # the whole --low-vram avatar 480P, 3 s of audio, 4 steps (~4 min, ~25 GB of disk)
    PYTHONPATH=src:. python bench/bench_fp8_scaled.py --parts pipeline --json $OUT/fp8_scaled_pipeline.json

Part `transformer`: the transformer is built with random bf16 weights (`--layers` blocks, default all 40; seed 0, the
`_keep_in_fp32_modules` in fp32) and written to `--folder` as kijai's `*_fp8_scaled*` files are laid out (Wan-native
names, the block linear weights float8_e4m3fn with one float32 `scale_weight` each, a `scaled_fp8` marker, the
fp32-kept tensors in fp32, the rest bf16), with `--bf16-file` also as an original bf16 single file. Then, one
setting at a time on the GPU (the others freed):

  bf16                 `from_single_file` of the bf16 file (without `--bf16-file`: the same weights built in place)
  fp8_weight_only      the preset: bf16 weights + torchao FP8 weight-only (per-row scales) on the block linears
  fp8_dynamic          the preset: FP8 weights and per-tensor FP8 activations (eager; faster only compiled)
  fp8_storage          the preset: layerwise casting (FP8 storage, bf16 compute, no scales)
  fp8_scaled           `from_single_file` of the FP8-scaled file, FP8 kept (the file's bytes and scales)
  fp8_scaled_dequant   the same file with `keep_fp8=False` (bf16 weights)
  fp8_scaled_low_vram  the FP8-scaled file loaded on the CPU + block-level group offload (the `--low-vram` streaming)

Rows: load seconds (files: read from the page cache right after writing them), GPU GiB of weights after loading,
peak GiB and median ms of one denoising step (the forward shapes of bench_transformer.py), relative output error
against bf16 on the same weights, file GiB.

Part `pipeline`: random real-size talking-avatar components (bench_pipeline.py), the transformer and the text
encoder written as FP8-scaled files (kijai's layout; ComfyUI's `umt5_xxl_fp8_e4m3fn_scaled` layout: transformers
names, `scale_weight`, marker), then two whole runs with `apply_memory_mode(pipe, "low_vram")`: the bf16 components
(the preset quantises the transformer itself) and `from_comfyui`-loaded FP8 files (kept FP8, not quantised again).
Peak GPU memory, total seconds, frames and the relative difference of the two videos. `--tiny --device cpu` checks
the script on the tiny configs.
"""

from __future__ import annotations

import argparse
import gc
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]

from bench_pipeline import AVATAR_SIZES, real_components  # noqa: E402
from bench_transformer import SHAPES, TINY_SHAPE, add_run_arguments, build_model, make_inputs, sync, write_json  # noqa: E402

from skyreels_diffusers.app.tasks import TASKS  # noqa: E402
from skyreels_diffusers.app.tiny import tiny_components  # noqa: E402
from skyreels_diffusers.loaders.comfyui import load_pipeline_from_files  # noqa: E402
from skyreels_diffusers.loaders.scaled_fp8 import quantize_to_fp8  # noqa: E402
from skyreels_diffusers.loaders.tensor_io import PlannedTensor, write_safetensors_shards  # noqa: E402
from skyreels_diffusers.models import SkyReelsV3Transformer3DModel  # noqa: E402
from skyreels_diffusers.models.configs import TINY_TRANSFORMER_CONFIGS, TRANSFORMER_CONFIGS  # noqa: E402
from skyreels_diffusers.optimization import apply_memory_mode, quantize_transformer  # noqa: E402
from tests.conversion.community_files import _FUSED_AUDIO_KV, _OURS_TO_WAN  # noqa: E402


WEIGHTS = (
    "bf16",
    "fp8_weight_only",
    "fp8_dynamic",
    "fp8_storage",
    "fp8_scaled",
    "fp8_scaled_dequant",
    "fp8_scaled_low_vram",
)
BLOCK_LINEAR = re.compile(r"blocks\.\d+\.(?!.*norm).*\.weight")
RUN_DTYPES = {"default": torch.bfloat16, "vae": torch.float32, "audio_encoder": torch.float32}


# --------------------------------------------------------------------------------------------- files
def wan_name(key: str) -> str:
    """Our transformer key -> its Wan-native name (the independent inverse table of the tests)."""
    for pattern, target in _OURS_TO_WAN:
        m = re.fullmatch(pattern, key)
        if m:
            return m.expand(target) if isinstance(target, str) else target(m)
    raise KeyError(key)


def _fp8_planned(name: str, tensor_fn, shape, scale_suffix: str) -> list[PlannedTensor]:
    cache = {}

    def quantised():
        if not cache:
            cache["q"], cache["s"] = (t.cpu() for t in quantize_to_fp8(tensor_fn()))
        return cache

    layer = name.removesuffix(".weight")
    return [  # written weight first, then its scale: both popped, nothing stays cached
        PlannedTensor(name, tuple(shape), torch.float8_e4m3fn, lambda: quantised().pop("q")),
        PlannedTensor(layer + scale_suffix, (), torch.float32, lambda: quantised().pop("s")),
    ]


def kijai_transformer_tensors(model, fp8: bool = True) -> list[PlannedTensor]:
    """kijai's `*_fp8_scaled*` layout of the transformer, streamed tensor by tensor (`fp8=False`: the original
    Wan-native bf16 single file, the fp32-kept tensors in fp32)."""
    state, keep = model.state_dict(), set(model._keep_in_fp32_modules)
    marker = PlannedTensor("scaled_fp8", (0,), torch.float8_e4m3fn, lambda: torch.empty(0, dtype=torch.float8_e4m3fn))
    planned = [marker] if fp8 else []
    for key, value in state.items():
        fused = re.fullmatch(_FUSED_AUDIO_KV, key)
        if fused and fused[2] == "v":
            continue
        if fused:  # Wan's fused audio key/value projection: k rows, then v rows
            other = key.replace(".to_k.", ".to_v.")
            name = f"blocks.{fused[1]}.audio_cross_attn.kv_linear.{fused[3]}"
            shape = (2 * value.shape[0], *value.shape[1:])
            produce = lambda k=key, o=other: torch.cat([state[k], state[o]])  # noqa: E731
        else:
            name, shape, produce = wan_name(key), value.shape, (lambda k=key: state[k])
        if fp8 and value.ndim == 2 and BLOCK_LINEAR.fullmatch(name):
            planned += _fp8_planned(name, produce, shape, ".scale_weight")
        else:
            dtype = torch.float32 if keep & set(key.split(".")) else torch.bfloat16
            planned.append(PlannedTensor(name, tuple(shape), dtype, lambda p=produce: p().cpu()))
    return planned


def comfyui_umt5_tensors(model) -> list[PlannedTensor]:
    """ComfyUI's `umt5_xxl_fp8_e4m3fn_scaled` layout: transformers names, block linears FP8 + `scale_weight`."""
    planned = [
        PlannedTensor("scaled_fp8", (0,), torch.float8_e4m3fn, lambda: torch.empty(0, dtype=torch.float8_e4m3fn))
    ]
    for key, value in model.state_dict().items():
        if key == "encoder.embed_tokens.weight":
            continue
        if key.startswith("encoder.block.") and value.ndim == 2 and "relative_attention_bias" not in key:
            planned += _fp8_planned(key, lambda v=value: v, value.shape, ".scale_weight")
        else:
            planned.append(PlannedTensor(key, tuple(value.shape), torch.bfloat16, lambda v=value: v.cpu()))
    return planned


def original_transformer_tensors(model, variant: str) -> list[PlannedTensor]:
    """The original bf16 single file: Wan-native names (avatar), diffusers names (reference = ours)."""
    if variant == "avatar":
        return kijai_transformer_tensors(model, fp8=False)
    return [PlannedTensor(k, tuple(v.shape), v.dtype, lambda v=v: v.cpu()) for k, v in model.state_dict().items()]


def write_file(planned: list[PlannedTensor], folder: Path, name: str) -> tuple[Path, float]:
    start = time.perf_counter()
    write_safetensors_shards(folder, planned, name, max_shard_size=2**62, description=name)
    return folder / f"{name}.safetensors", time.perf_counter() - start


# --------------------------------------------------------------------------------------------- transformer
def weight_gib(model) -> float:
    """GiB of the model's stored weights (FP8 tensors: their bytes and scales)."""
    total = 0
    for p in list(model.parameters()) + list(model.buffers()):
        parts = (p.qdata, p.scale) if hasattr(p, "qdata") else (p,)
        total += sum(t.numel() * t.element_size() for t in parts)
    return total / 2**30


def _group_offload(model, device):
    stream = device.type == "cuda"
    model.enable_group_offload(
        device,
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
        use_stream=stream,
        record_stream=stream,
    )


def prepare(weights: str, variant: str, cfg: dict, device, files: dict) -> SkyReelsV3Transformer3DModel:
    if weights == "bf16" and "bf16" in files:
        model = SkyReelsV3Transformer3DModel.from_single_file(
            files["bf16"], variant=variant, config=cfg, torch_dtype=torch.bfloat16, device=device
        )
    elif weights in ("bf16", "fp8_weight_only", "fp8_dynamic", "fp8_storage"):
        model = build_model(cfg, device)
        if weights != "bf16":
            quantize_transformer(model, weights)
    else:
        model = SkyReelsV3Transformer3DModel.from_single_file(
            files["fp8"],
            variant=variant,
            config=cfg,
            torch_dtype=torch.bfloat16,
            keep_fp8=weights != "fp8_scaled_dequant",
            device="cpu" if weights == "fp8_scaled_low_vram" else device,
        )
        if weights == "fp8_scaled_low_vram":
            _group_offload(model, device)
    model.set_attention_backend("native")
    return model.eval().requires_grad_(False)


@torch.no_grad()
def time_step(model, inputs, device, warmup: int, repeats: int) -> tuple[float, float, torch.Tensor]:
    for _ in range(warmup):
        model(**inputs)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = model(**inputs).sample
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return sorted(times)[len(times) // 2], peak, out.float().cpu()


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_transformer(variant: str, resolutions: list[str], args, device, folder: Path, rows: list) -> None:
    configs = TINY_TRANSFORMER_CONFIGS if args.tiny else TRANSFORMER_CONFIGS
    cfg = {**configs[variant], "num_layers": args.layers or configs[variant]["num_layers"]}
    base = build_model(cfg, device)
    files, written = {}, {}
    files["fp8"], written["fp8"] = write_file(kijai_transformer_tensors(base), folder, f"{variant}_fp8_scaled")
    if args.bf16_file:
        files["bf16"], written["bf16"] = write_file(
            original_transformer_tensors(base, variant), folder, f"{variant}_bf16"
        )
    del base
    free(device)
    references = {}
    for weights in ["bf16", *(w for w in args.weights if w != "bf16")]:
        if args.budget_s and time.perf_counter() - args.started > args.budget_s:
            rows.append({"part": "transformer", "variant": variant, "weights": weights, "skipped": "time budget"})
            continue
        sync(device)
        start = time.perf_counter()
        try:
            model = prepare(weights, variant, cfg, device, files)
        except (AssertionError, RuntimeError, ImportError) as error:  # a preset this machine cannot run: reported
            rows.append({"part": "transformer", "variant": variant, "weights": weights, "error": str(error)[:300]})
            print(rows[-1], flush=True)
            free(device)
            continue
        sync(device)
        load_s = time.perf_counter() - start
        on_gpu = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else weight_gib(model)
        file = files["fp8"] if weights.startswith("fp8_scaled") else files.get("bf16") if weights == "bf16" else None
        for resolution in resolutions:
            frames, height, width = TINY_SHAPE if args.tiny else SHAPES[(variant, resolution)]
            inputs = make_inputs(variant, frames, height, width, cfg, device)
            ms, peak, out = time_step(model, inputs, device, args.warmup, args.repeats)
            references.setdefault(resolution, out)
            reference = references[resolution]
            rows.append(
                {
                    "part": "transformer",
                    "variant": variant,
                    "resolution": resolution,
                    "weights": weights,
                    "layers": cfg["num_layers"],
                    "load_s": round(load_s, 1),
                    "weights_gib": round(on_gpu, 2),
                    "stored_weights_gib": round(weight_gib(model), 2),
                    "stored_weights_bytes": int(weight_gib(model) * 2**30),
                    "peak_gib": round(peak, 2),
                    "ms_per_step": round(ms, 1),
                    "rel_error_vs_bf16": round(float((out - reference).norm() / reference.norm()), 5),
                    "file_gib": round(file.stat().st_size / 2**30, 2) if file else None,
                    "file_write_s": round(written["fp8" if weights.startswith("fp8_scaled") else "bf16"], 1)
                    if file
                    else None,
                }
            )
            print(rows[-1], flush=True)
            write_json(args.json, {"rows": rows})
            del inputs, out
        del model
        free(device)
    for file in files.values():
        file.unlink()


# --------------------------------------------------------------------------------------------- pipeline
def run_pipeline(args, device, folder: Path, rows: list) -> None:
    task = "talking_avatar"
    spec = TASKS[task]
    components = tiny_components(task) if args.tiny else real_components(task, device)
    height, width = (32, 48) if args.tiny else AVATAR_SIZES["480P"]
    transformer_file, _ = write_file(kijai_transformer_tensors(components["transformer"]), folder, "a2v_fp8_scaled")
    text_file, _ = write_file(comfyui_umt5_tensors(components["text_encoder"]), folder, "umt5_xxl_fp8_e4m3fn_scaled")
    for component in components.values():
        if isinstance(component, torch.nn.Module):
            component.to("cpu")
    free(device)
    videos = {}
    for setting in ("bf16_low_vram", "fp8_scaled_low_vram"):
        start = time.perf_counter()
        if setting == "bf16_low_vram":
            pipe = spec.pipeline_class(**components)
        else:
            others = {k: v for k, v in components.items() if k not in ("transformer", "text_encoder")}
            pipe = load_pipeline_from_files(
                spec.pipeline_class,
                transformer=transformer_file,
                text_encoder=text_file,
                torch_dtype=RUN_DTYPES,
                configs={"transformer": TINY_TRANSFORMER_CONFIGS["avatar"]} if args.tiny else None,
                **others,
            )
        load_s = time.perf_counter() - start
        pipe.set_progress_bar_config(disable=True)
        apply_memory_mode(pipe, "low_vram", device)
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = pipe(**_avatar_call(height, width, args.avatar_seconds, args.steps))
        sync(device)
        videos[setting] = np.asarray(out.frames[0], dtype=np.float32)
        reference = videos["bf16_low_vram"]
        rows.append(
            {
                "part": "pipeline",
                "task": task,
                "resolution": "480P",
                "setting": setting,
                "seconds_of_audio": args.avatar_seconds,
                "steps": args.steps,
                "frames": int(videos[setting].shape[0]),
                "load_s": round(load_s, 1),
                "total_s": round(time.perf_counter() - start, 1),
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else 0.0,
                "transformer_weights_gib": round(weight_gib(pipe.transformer), 2),
                "text_encoder_weights_gib": round(weight_gib(pipe.text_encoder), 2),
                "rel_diff_vs_bf16_low_vram": round(
                    float(np.linalg.norm(videos[setting] - reference) / max(np.linalg.norm(reference), 1e-12)), 5
                ),
            }
        )
        print(rows[-1], flush=True)
        write_json(args.json, {"rows": rows})
        del pipe, out
        components.pop("transformer", None)
        components.pop("text_encoder", None)
        free(device)
    transformer_file.unlink()
    text_file.unlink()


def _avatar_call(height: int, width: int, seconds: float, steps: int) -> dict:
    rng = np.random.default_rng(0)
    import PIL.Image

    t = np.arange(int(seconds * 16000)) / 16000
    audio = (0.3 * np.sin(2 * np.pi * 200 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    return dict(
        image=PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)),
        audio=audio,
        audio_sample_rate=16000,
        prompt="a person talks",
        height=height,
        width=width,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )


# --------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["transformer", "pipeline"], choices=["transformer", "pipeline"])
    parser.add_argument("--cases", nargs="+", default=["avatar:480P", "avatar:720P"], help="variant:resolution pairs")
    parser.add_argument("--weights", nargs="+", default=list(WEIGHTS), choices=WEIGHTS)
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks (default: the model's 40)")
    parser.add_argument("--bf16-file", action="store_true", help="also write and load an original bf16 file")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--avatar-seconds", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument(
        "--folder", default=None, help="where the files are written (default: a temporary folder here)"
    )
    parser.add_argument("--budget-s", type=float, default=540.0, help="skip the remaining settings after this long")
    add_run_arguments(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.started = time.perf_counter()
    cases = [tuple(case.split(":")) for case in args.cases]
    bad = [case for case in cases if case[0] not in ("reference", "avatar") or case not in SHAPES]
    if bad:
        raise SystemExit(f"--cases: {bad} not among {sorted(k for k in SHAPES if k[0] != 'extension')}")
    device = torch.device(args.device)
    folder = Path(tempfile.mkdtemp(prefix="fp8_scaled_", dir=args.folder or ROOT))
    rows: list[dict] = []
    try:
        if "transformer" in args.parts:
            for variant in dict.fromkeys(v for v, _ in cases):
                run_transformer(variant, [r for v, r in cases if v == variant], args, device, folder, rows)
        if "pipeline" in args.parts:
            run_pipeline(args, device, folder, rows)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    env = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
    }
    print_table(rows)
    write_json(args.json, {"env": env, "rows": rows})
    return 0


def print_table(rows: list[dict]) -> None:
    print("\n| case | weights | load s | weights GiB | peak GiB | ms/step | vs bf16 | rel. error | file GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("part") != "transformer" or "ms_per_step" not in r:
            continue
        base = next(
            x["ms_per_step"]
            for x in rows
            if x.get("weights") == "bf16"
            and x.get("variant") == r["variant"]
            and x.get("resolution") == r["resolution"]
        )
        print(
            f"| {r['variant']} {r['resolution']} | {r['weights']} | {r['load_s']} | {r['weights_gib']} | "
            f"{r['peak_gib']} | {r['ms_per_step']} | {r['ms_per_step'] / base:.2f}x | {r['rel_error_vs_bf16']:.4f} | "
            f"{r['file_gib'] if r['file_gib'] is not None else '-'} |"
        )
    print("\n| pipeline | setting | load s | total s | peak GiB | transformer GiB | text encoder GiB | diff vs bf16 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("part") == "pipeline":
            print(
                f"| avatar 480P {r['seconds_of_audio']} s, {r['steps']} steps | {r['setting']} | {r['load_s']} | "
                f"{r['total_s']} | {r['peak_gib']} | {r['transformer_weights_gib']} | {r['text_encoder_weights_gib']} "
                f"| {r['rel_diff_vs_bf16_low_vram']:.4f} |"
            )


if __name__ == "__main__":
    raise SystemExit(main())
