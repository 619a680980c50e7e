"""One run of a validated request: load the task's pipeline (tiny or a converted folder, with the memory, speed and
parallel options), generate, and write the mp4. Under torchrun every rank runs this; rank 0 writes."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .output import check_output_writable, default_output_path, write_or_keep, write_windows
from .request import (
    COMPONENT_FILE_FLAGS,
    GenerationRequest,
    check_parallel,
    loading,
    output_size,
    pipeline_kwargs,
    reported,
    run_device,
    uses_component_files,
    validate,
)
from .tiny import tiny_pipeline


#: the dtypes of a run's components: bf16, the VAE and wav2vec2 in float32 (as in the original)
RUN_DTYPES = {"default": torch.bfloat16, "vae": torch.float32, "audio_encoder": torch.float32}


def load_transformer_file(request: GenerationRequest):
    """`--transformer FILE`: the transformer from an original single file, a community GGUF (kept quantised, bf16
    compute) or a kijai / ComfyUI FP8-scaled file (kept FP8), configured by the pipeline folder's
    `transformer/config.json`."""
    from ..models import SkyReelsV3Transformer3DModel

    kwargs = {}
    if request.transformer.endswith(".gguf"):
        from diffusers import GGUFQuantizationConfig

        kwargs["quantization_config"] = GGUFQuantizationConfig(compute_dtype=torch.bfloat16)
    return SkyReelsV3Transformer3DModel.from_single_file(
        request.transformer,
        variant=request.spec.variant,
        config=Path(request.model) / "transformer",
        torch_dtype=torch.bfloat16,
        **kwargs,
    )


def load_component_files(request: GenerationRequest, skip: dict) -> dict:
    """`--text-encoder / --vae / --image-encoder / --audio-encoder FILE` beside a pipeline folder: those components
    from their files (the folder supplies the rest)."""
    from ..loaders import component_files as files

    given = {}
    loaders = {
        "text_encoder": lambda path: {"text_encoder": files.load_text_encoder_file(path, torch.bfloat16)},
        "vae": lambda path: {"vae": files.load_vae_file(path)},
        "image_encoder": lambda path: {"image_encoder": files.load_image_encoder_file(path, torch.bfloat16)},
        "audio_encoder": lambda path: dict(
            zip(("audio_encoder", "feature_extractor"), files.load_audio_encoder_file(path))
        ),
    }
    for name, load in loaders.items():
        if getattr(request, name) is not None and name not in skip:
            with loading(name):  # a damaged or foreign file: one line under its flag
                given.update(load(getattr(request, name)))
    return given


def load_pipeline_files(request: GenerationRequest, skip: dict):
    """The task's pipeline from single component files (a ComfyUI `models` folder and / or the component flags)."""
    from ..loaders.comfyui import DEFAULT_TOKENIZER, load_pipeline_from_files

    return load_pipeline_from_files(
        request.spec.pipeline_class,
        request.model or None,
        scheduler=request.spec.make_scheduler(),
        tokenizer=request.tokenizer or DEFAULT_TOKENIZER,
        torch_dtype=RUN_DTYPES,
        transformer_variant=request.spec.variant,
        skip=tuple(skip),
        **{name: getattr(request, name) for name in COMPONENT_FILE_FLAGS if getattr(request, name) is not None},
    )


def load_pipeline(request: GenerationRequest):
    """The task's pipeline: tiny random weights in-process, a converted folder, or single component files (a ComfyUI
    models folder and / or the component flags); bf16, the VAE and wav2vec2 in float32."""
    from .distributed import drop_main_only_encoders, encoder_kwargs_to_skip, world_info

    if request.model == "tiny":
        print("[skyreels-v3] --model tiny: tiny RANDOM weights, the output is noise (for trying the tools).")
        pipe = tiny_pipeline(request.task, seed=0)
        drop_main_only_encoders(pipe)  # under torchrun, rank 0 alone runs the text and audio encoders
    elif uses_component_files(request):
        with loading("model"):  # a component's own file is reported under its flag (`InputError`)
            pipe = load_pipeline_files(request, encoder_kwargs_to_skip(*world_info()[::-1]))
    else:
        from ..loaders.pipeline_folder import load_pipeline_folder

        given = encoder_kwargs_to_skip(*world_info()[::-1])
        given.update(load_component_files(request, given))
        if request.transformer is not None:
            with loading("transformer"):
                given["transformer"] = load_transformer_file(request)
        # strict: the folder's pipeline class, every file and every weight checked (wav2vec2 in float32, as in the
        # original; the VAE in float32)
        with loading("model"):
            pipe = load_pipeline_folder(request.model, request.spec.pipeline_class, RUN_DTYPES, **given)
    from ..optimization import apply_memory_mode, enable_fast_path, quantize_transformer

    device = run_device(request.device)
    if request.quantize is not None:
        quantize_transformer(pipe.transformer, request.quantize, compute_dtype=pipe.transformer.dtype)
    mode = (
        "low_vram"
        if request.low_vram
        else "group"
        if request.group_offload
        else "sequential"
        if request.sequential_offload
        else "offload"
        if request.offload
        else "resident"
    )
    if request.shard_weights:  # the transformer goes to the GPU as shards (distributed.parallelize)
        from .distributed import place_all_but_transformer

        place_all_but_transformer(pipe, torch.device(device))
    else:
        apply_memory_mode(pipe, mode, device)
    # xfuser's attention is a graph break (`torch.compiler.disable`): its blocks compile in pieces
    enable_fast_path(
        pipe,
        compile=request.compile,
        attention_backend=request.attention_backend,
        fullgraph=request.parallel_backend != "xfuser",
    )
    return pipe


def _validate_everywhere(request: GenerationRequest) -> GenerationRequest:
    """Validate on rank 0 (which alone reads the inputs) and hand the result, or the error, to every rank."""
    import torch.distributed as dist

    from ..parallel.context_parallel import broadcast_from_main

    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1 and request.ulysses_degree * request.ring_degree == 1:
        return validate(request)
    outcome = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            outcome = validate(request)
            check_parallel(outcome, world)
        except ValueError as error:
            outcome = error
    outcome = broadcast_from_main(outcome)
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


@dataclass
class GeneratedVideo:
    """What a run writes: uint8-able frames `[F, H, W, 3]` in [0, 1] and the audio to mux (or None)."""

    frames: np.ndarray
    audio: np.ndarray | None = None
    audio_sample_rate: int | None = None


def run(
    request: GenerationRequest,
    pipe=None,
    callback_on_step_end=None,
    callback_on_window_end=None,
    should_stop=None,
) -> Path | None:
    """Validate, load, generate and write the mp4; returns its path (None on ranks other than 0 under torchrun, and
    when `should_stop()` turned true during the run: a cancelled job writes nothing). A task made window by window
    (the registry's `windowed`: the talking avatar) writes its mp4 as it grows, playable while the run goes on."""
    from ..parallel import init_distributed

    _, world, device = init_distributed()
    if world > 1 and request.device is None:
        request = dataclasses.replace(request, device=str(device))
    if request.media is None:
        request = _validate_everywhere(request)
    output = Path(request.output) if request.output else default_output_path(request)
    check_output_writable(output, overwrite=request.overwrite)
    pipe = pipe or load_pipeline(request)
    if request.spec.windowed:
        kwargs = prepare_call(request, pipe, callback_on_step_end, callback_on_window_end)
        with arguments_under_their_flags():
            return write_windows(pipe, kwargs, output, request, should_stop)
    video = generate(request, pipe, callback_on_step_end, callback_on_window_end)
    if video is None or (should_stop is not None and should_stop()):
        return None
    return write_or_keep(
        video.frames,
        output,
        overwrite=request.overwrite,
        unique=not request.output,  # a default name taken meanwhile (another run) -> the next free one
        fps=request.fps,
        audio=video.audio,
        audio_sample_rate=video.audio_sample_rate,
        crf=request.crf,
    )


@contextmanager
def arguments_under_their_flags():
    """An argument refused during the run (e.g. a resume folder) is reported under the flag that sets it; a run that
    failed on purpose (the NaN guard, out of memory) as a `RunFailure` (one line)."""
    try:
        yield
    except (ValueError, FloatingPointError, torch.OutOfMemoryError) as error:
        raise reported(error) from None


def prepare_call(
    request: GenerationRequest,
    pipe,
    callback_on_step_end=None,
    callback_on_window_end=None,
    embeddings: dict | None = None,
) -> dict:
    """Under torchrun, share the pipeline out over the ranks (once per pipeline) and run the encoders once; returns
    the pipeline call's keyword arguments.

    `embeddings`: encoder outputs that replace the pipeline's own encoder calls (`prompt_embeds`, ...,
    `audio_embeds`: `TaskSpec.embeddings`); under torchrun rank 0 computes them and every rank receives them."""
    from ..parallel import init_distributed, is_main_process
    from .distributed import parallelize, precomputed_embeddings

    _, world, device = init_distributed()
    if world > 1:  # tokens, VAE tiles (and with --shard-weights the weights) over the ranks; once per pipeline
        parallelize(
            pipe, request.ulysses_degree, request.ring_degree, request.parallel_backend, request.shard_weights, device
        )
        pipe.set_progress_bar_config(disable=not is_main_process())
    size = output_size(request)
    if embeddings is None and world > 1:  # encoders once: rank 0 encodes, every rank receives the embeddings
        embeddings = precomputed_embeddings(pipe, request.task, device, **embedding_inputs(request, size))
    return call_arguments(request, size, embeddings, callback_on_step_end, callback_on_window_end)


def generate(
    request: GenerationRequest,
    pipe,
    callback_on_step_end=None,
    callback_on_window_end=None,
    embeddings: dict | None = None,
) -> GeneratedVideo | None:
    """Run the task's pipeline on a validated request: what `run` does between loading and writing, the whole video
    at once (None on ranks other than 0 under torchrun). `embeddings`: see `prepare_call`."""
    from ..parallel import is_main_process
    from .distributed import muxed_audio

    kwargs = prepare_call(request, pipe, callback_on_step_end, callback_on_window_end, embeddings)
    with arguments_under_their_flags():
        out = pipe(**kwargs)
    if not is_main_process():
        return None
    audio, rate = getattr(out, "audio", None), getattr(out, "audio_sample_rate", None)
    speech = request.media.speech
    if audio is None and speech is not None:
        output_audio = request.output_audio or ("normalized" if request.reproduce_original else "original")
        audio, rate = muxed_audio(speech, output_audio)
    return GeneratedVideo(np.asarray(out.frames[0]), audio, rate)


def embedding_inputs(request: GenerationRequest, size: tuple[int | None, int | None]) -> dict:
    """What `TaskSpec.embeddings` encodes for a validated request."""
    return dict(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        guidance_scale=request.guidance_scale,
        height=size[0],
        width=size[1],
        window_prompt=pipeline_kwargs(request, size).get("window_prompt"),
        portrait=request.media.portrait,
        speech=request.media.speech,
    )


def call_arguments(
    request: GenerationRequest,
    size: tuple[int | None, int | None],
    embeddings: dict | None = None,
    callback_on_step_end=None,
    callback_on_window_end=None,
) -> dict:
    """The pipeline call of a validated request: `pipeline_kwargs`, the seeded generator, the callbacks, and the
    precomputed `embeddings` in place of the prompts (and of the audio and window prompt they encode)."""
    from ..parallel import is_main_process
    from .distributed import pipeline_text_kwargs

    extra = {
        "callback_on_step_end": callback_on_step_end,
        "generator": torch.Generator(device="cpu").manual_seed(request.seed),
    }
    if request.spec.windowed:
        extra.update(callback_on_window_end=callback_on_window_end, write_resume=is_main_process())
    if embeddings:
        extra.update(pipeline_text_kwargs(embeddings))
        if "audio_embeds" in embeddings:  # precomputed: the features and the window prompt's embeddings
            extra.update(audio=None, window_prompt=None)
    return pipeline_kwargs(request, size, **extra)
