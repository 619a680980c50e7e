"""`skyreels-v3`: the command line of skyreels-diffusers (mirrors the original `generate_video.py`).

    skyreels-v3 generate --task reference_to_video --model tiny --ref-imgs a.png b.png --prompt "..."
    skyreels-v3 generate --task single_shot_extension --model PATH --input-video in.mp4 --duration 10
    torchrun --nproc_per_node 4 -m skyreels_diffusers.app.cli generate ... --ulysses-degree 4

Flags are kebab-case; the original's snake_case spellings (`--task_type`, `--model_id`, `--ref_imgs`,
`--input_video`, ...) are accepted too. The written path is printed last.
"""

from __future__ import annotations

import argparse
import os
import sys

from .request import (
    COMPONENT_FILE_FLAGS,
    GenerationRequest,
    RunFailure,
    check_device,
    check_parallel,
    reported,
    request_fields,
)
from .run import run
from .tasks import DEFAULT_PROMPT, DEFAULT_SEED, TASKS, per_task


def _flag(parser, name: str, *aliases: str, **kwargs):
    spellings = [f"--{name}"]
    snake = f"--{name.replace('-', '_')}"
    if snake not in spellings:
        spellings.append(snake)
    for alias in aliases:
        spellings += [f"--{alias}", f"--{alias.replace('-', '_')}"]
    parser.add_argument(*dict.fromkeys(spellings), dest=kwargs.pop("dest", name.replace("-", "_")), **kwargs)


def _add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """What to generate: task, model, prompt, length, size, seed, steps."""
    _flag(parser, "task", "task-type", required=True, choices=list(TASKS))
    _flag(
        parser,
        "model",
        "model-id",
        default=None,
        help="'tiny' (random weights, offline), a converted pipeline folder (scripts/convert_checkpoints.py), or a "
        "ComfyUI models folder (diffusion_models/, text_encoders/, vae/, clip_vision/, wav2vec2/: each component is "
        "the one file there of its layout; name the transformer with --transformer)",
    )
    _flag(
        parser,
        "transformer",
        default=None,
        help="a single-file transformer (replacing a pipeline folder's): kijai's / ComfyUI's FP8-scaled file (kept "
        "FP8), community GGUF (kept quantised) or original .safetensors/.pth; a bare name is looked up in the ComfyUI "
        "folder's diffusion_models/ (with --low-vram a quantised transformer streams as is)",
    )
    for name, what in (
        ("text-encoder", "UMT5-XXL (ComfyUI's bf16 or fp8_e4m3fn_scaled, kijai's, the original .pth)"),
        ("vae", "Wan2.1 VAE (wan_2.1_vae.safetensors, Wan2.1_VAE.pth)"),
        ("image-encoder", "CLIP ViT-H/14 vision (clip_vision_h.safetensors; talking avatar)"),
        ("audio-encoder", "wav2vec2 (kijai's wav2vec2-chinese-base file; talking avatar)"),
    ):
        _flag(parser, name, default=None, help=f"component file: {what}")
    _flag(
        parser,
        "tokenizer",
        default=None,
        help="with component files: a tokenizer folder or Hub id (default google/umt5-xxl)",
    )
    _flag(parser, "prompt", default=DEFAULT_PROMPT)
    _flag(parser, "negative-prompt", default=None)
    _flag(
        parser,
        "duration",
        type=int,
        default=None,
        help="seconds; shot switching 2-5 (default: "
        + per_task(lambda spec: spec.defaults.duration or "the audio's length")
        + ")",
    )
    _flag(
        parser,
        "resolution",
        choices=["480P", "540P", "720P"],
        default=None,
        help=f"bucket table (default: {per_task(_resolution)}; with --model tiny a 256-px size unless given)",
    )
    _flag(parser, "height", type=int, default=None, help="output height, multiple of 16 (overrides the bucket)")
    _flag(parser, "width", type=int, default=None, help="output width, multiple of 16 (overrides the bucket)")
    _flag(parser, "seed", type=int, default=DEFAULT_SEED)
    _flag(
        parser,
        "steps",
        "num-inference-steps",
        type=int,
        default=None,
        help=f"denoising steps, per clip for the avatar (default: {per_task(lambda spec: spec.defaults.steps)})",
    )
    _flag(
        parser,
        "guidance-scale",
        type=float,
        default=None,
        help=f"text guidance, 1 = off (default: {per_task(lambda spec: spec.defaults.guidance_scale)})",
    )


def _resolution(spec) -> str:
    original = spec.defaults.original_resolution
    return spec.defaults.resolution + (f" ({original} with --reproduce-original)" if original else "")


def _add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """The task inputs and their options."""
    _flag(parser, "ref-imgs", nargs="+", default=[], help="1-4 reference images (space or comma separated)")
    _flag(parser, "input-video", default=None)
    _flag(
        parser,
        "keep-source-fps",
        action="store_true",
        help="count the duration in, and write at, the input video's frame rate instead of 24 fps",
    )
    _flag(
        parser,
        "resize-mode",
        choices=["bilinear", "bicubic", "area", "nearest"],
        default=None,
        help="input video resize (default bilinear; 'nearest' = the original)",
    )
    _flag(parser, "return-input-video", action="store_true", help="prepend the input video to the output")
    _flag(parser, "input-image", default=None, help="talking_avatar: the portrait")
    _flag(parser, "input-audio", default=None, help="talking_avatar: speech (wav, mp3, flac, m4a)")
    _flag(
        parser,
        "window-prompt",
        default=None,
        help="talking_avatar: prompt of the sliding windows (default 'a person is talking', the original's)",
    )
    _flag(parser, "prompt-in-every-window", action="store_true", help="talking_avatar: use --prompt in every window")
    _flag(
        parser,
        "clip-from-reference",
        action="store_true",
        help="talking_avatar: CLIP tokens from the portrait in every window",
    )
    _flag(
        parser,
        "output-audio",
        choices=["original", "normalized"],
        default=None,
        help="talking_avatar: mux the original audio (default) or the -23 LUFS one (the original's)",
    )
    _flag(
        parser,
        "max-audio-seconds",
        type=float,
        default=None,
        help=f"longest accepted audio, in seconds (default: {per_task(lambda spec: spec.defaults.max_audio_seconds)})",
    )
    _flag(parser, "resume-dir", default=None, help="talking_avatar: per-window checkpoints; rerun to resume")
    _flag(
        parser,
        "reproduce-original",
        action="store_true",
        help="the original code's conventions where this package improves on them (per-chunk re-seeding, "
        "truncation to uint8, nearest resizing, bf16 scheduler input, normalised audio): the original's "
        "video for the same inputs and seed (docs/fidelity.md)",
    )


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Output, fidelity, memory, speed and parallel options of a run."""
    _flag(
        parser,
        "output",
        default=None,
        help="mp4 path (default result/<task>/<seed>_<timestamp>.mp4, made unique); an existing file is not replaced "
        "without --overwrite",
    )
    _flag(parser, "overwrite", action="store_true", help="replace the --output file when it exists")
    _flag(parser, "crf", type=int, default=10, help="H.264 quality, 0 (lossless) to 51 (default 10, the original's)")
    _flag(parser, "offload", action="store_true", help="model CPU offload: one component on the GPU at a time")
    _flag(
        parser,
        "low-vram",
        action="store_true",
        help="FP8 transformer weights + block-level group offload + VAE tiling (fits 24 GB cards)",
    )
    _flag(parser, "group-offload", action="store_true", help="block-level group offload with CUDA-stream prefetch")
    _flag(parser, "sequential-offload", action="store_true", help="leaf-level CPU offload (least memory, slowest)")
    _flag(
        parser,
        "quantize",
        choices=["fp8_weight_only", "fp8_dynamic", "fp8_storage"],
        default=None,
        help="FP8 transformer linear layers (torchao; fp8_storage = layerwise casting without torchao)",
    )
    _flag(parser, "compile", action="store_true", help="torch.compile the repeated transformer blocks")
    _flag(
        parser,
        "attention-backend",
        default=None,
        help="attention backend (default: fa3 on Hopper with FlashAttention-3 installed, else PyTorch SDPA's choice; "
        "e.g. native, _native_cudnn, fa3, fa3_fp8, triton_8bit, triton_8bit_accurate, sage)",
    )
    _flag(
        parser,
        "fast",
        action="store_true",
        help="lossy speed preset: 8-bit self-attention (of triton_8bit / fa3_fp8 the measured faster that runs here) + FP8 "
        "linears (fp8_dynamic) + compile (GPU with FP8; docs/performance.md has its speed and error)",
    )
    _flag(
        parser,
        "ulysses-degree",
        type=int,
        default=1,
        help="sequence parallelism over heads (torchrun --nproc_per_node = ulysses x ring degree)",
    )
    _flag(parser, "ring-degree", type=int, default=1, help="ring attention degree (needs a flash/sage/cuDNN backend)")
    _flag(
        parser,
        "parallel-backend",
        choices=["diffusers", "xfuser"],
        default="diffusers",
        help="sequence-parallel attention: diffusers' context parallelism (default; any token count) or xDiT's "
        "USP kernels (pip install xfuser; GPU only; token count divisible by the degree)",
    )
    _flag(
        parser,
        "shard-weights",
        action="store_true",
        help="under torchrun: shard the transformer's blocks over the processes (FSDP2; weight memory per GPU / N)",
    )
    _flag(parser, "device", default=None, help="cuda / cpu (default: cuda when available)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skyreels-v3", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate one video")
    _add_task_arguments(gen)
    _add_input_arguments(gen)
    _add_run_arguments(gen)
    app = sub.add_parser("app", help="start the local web app (pip install 'skyreels-diffusers[app]')")
    _flag(app, "model", default="tiny", help="'tiny' (default, random weights) or a converted pipeline folder")
    _flag(app, "host", default="127.0.0.1")
    _flag(app, "port", type=int, default=7860)
    _flag(app, "output-dir", default="result/app", help="results folder (files are never overwritten)")
    _flag(app, "offload", action="store_true")
    _flag(app, "low-vram", action="store_true")
    _flag(app, "ulysses-degree", type=int, default=1)
    _flag(app, "device", default=None)
    _add_serve_command(sub)
    return parser


def _add_serve_command(sub) -> None:
    from .serve import add_serve_arguments

    add_serve_arguments(
        sub.add_parser("serve", help="serve the videos API on Ray Serve (pip install 'skyreels-diffusers[serve]')")
    )


def generation_request(args: argparse.Namespace) -> GenerationRequest:
    """The request of parsed `generate` arguments: every flag left out stays None, i.e. the task's default."""
    values = {k: v for k, v in vars(args).items() if k in request_fields() and v is not None}
    if args.model is None and any(values.get(name) for name in COMPONENT_FILE_FLAGS):
        values["model"] = ""  # the pipeline from the component files alone
    return GenerationRequest(**values)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if args.command == "serve":
        from .serve import serve_main

        return serve_main(args)
    if args.command == "app":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        try:
            check_device(args.device)
            if args.ulysses_degree != 1 or world != 1:
                for task in TASKS:  # every tab's model must shard over the degree
                    check_parallel(
                        GenerationRequest(task=task, model=args.model, ulysses_degree=args.ulysses_degree), world
                    )
            from .web import check_port, launch

            if int(os.environ.get("RANK", "0")) == 0:  # the rank that serves the page
                check_port(args.host, args.port)
            launch(
                model=args.model,
                host=args.host,
                port=args.port,
                output_dir=args.output_dir,
                offload=args.offload,
                low_vram=args.low_vram,
                ulysses_degree=args.ulysses_degree,
                device=args.device,
            )
        except (ImportError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return 0
    if args.command == "generate":
        if args.model is None and not any(getattr(args, name, None) for name in COMPONENT_FILE_FLAGS):
            print(
                "error: --model: pass --model tiny (random weights), a converted pipeline folder or a ComfyUI models "
                "folder (or component files: --transformer --text-encoder --vae ...)",
                file=sys.stderr,
            )
            return 2
        from ..parallel import is_main_process

        try:
            path = run(generation_request(args))
        except Exception as error:  # noqa: BLE001 (what is raised on purpose: one line; anything else: a traceback)
            failure = reported(error)
            if failure is None:
                raise
            if is_main_process():
                print(f"error: {failure}", file=sys.stderr)
            return 1 if isinstance(failure, RunFailure) else 2
        except KeyboardInterrupt as interrupt:
            if is_main_process():
                again = (
                    "run the same command again to resume from --resume-dir"
                    if args.resume_dir
                    else "nothing was written"
                    if not interrupt.args
                    else ""
                )
                print(f"interrupted: {'; '.join(filter(None, [*interrupt.args[:1], again]))}.", file=sys.stderr)
            return 130
        finally:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        if path is not None:
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
