"""Memory and speed presets shared by the CLI, the benchmarks and users: offloading, FP8 and compilation.

Everything here goes through diffusers' own mechanisms (model / sequential / group offload hooks, layerwise
casting, `TorchAoConfig`, `compile_repeated_blocks`, `set_attention_backend`); nothing patches a forward.
"""

from __future__ import annotations

import torch


QUANTIZATION_MODES = ("fp8_weight_only", "fp8_dynamic", "fp8_storage")
# `--fast`'s 8-bit self-attention: the first of these that can run on the machine (`fast_preset`). The order is the
# measured one (docs/performance.md, "FlashAttention-3 and the 8-bit path"): `triton_8bit` (INT8 Q·K, FP8 P·V)
# and `fa3_fp8` (FlashAttention-3 in FP8, prepared inputs; needs FA3 and Hopper).
FAST_ATTENTION_BACKENDS = ("triton_8bit", "fa3_fp8")
# `--fast` (opt-in, lossy): 8-bit self-attention + FP8 linears + compiled blocks
FAST_PRESET = {"attention_backend": FAST_ATTENTION_BACKENDS[0], "quantize": "fp8_dynamic", "compile": True}
MEMORY_MODES = ("resident", "offload", "sequential", "group", "low_vram")
# Low-VRAM VAE tiles: up to 540P (544 x 960) a 5-s video decodes whole (12.2 GiB peak, measured; diffusers' 256-px
# tiles cut that to 3.8 GiB but took 1.7x as long, 2.7x inside the pipeline); 720P decodes in 960-px tiles.
LOW_VRAM_VAE_TILES = dict(
    tile_sample_min_height=960, tile_sample_min_width=960, tile_sample_stride_height=896, tile_sample_stride_width=896
)
# Linear layers outside the blocks stay in the compute dtype: embedders see raw inputs and `proj_out` writes the
# prediction, where FP8 rounding costs the most accuracy for the least memory.
NOT_QUANTIZED = ("patch_embedding", "condition_embedder", "audio_proj", "proj_out")


def _is_block_linear(model: torch.nn.Module):
    keep = set(model._keep_in_fp32_modules or ())

    def accept(module: torch.nn.Module, name: str) -> bool:
        parts = name.split(".")
        return isinstance(module, torch.nn.Linear) and parts[0] == "blocks" and not keep & set(parts)

    return accept


def holds_quantized_weights(model: torch.nn.Module) -> bool:
    """Whether `model` was loaded quantised: GGUF (diffusers' quantizer) or FP8 kept from a scaled-FP8 file (torchao
    tensors)."""
    if getattr(model, "hf_quantizer", None) is not None:
        return True
    return any(type(p).__module__.startswith("torchao") for p in model.parameters())


def _torchao_config(mode: str):
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig

    if mode == "fp8_weight_only":
        return Float8WeightOnlyConfig()
    if mode == "fp8_dynamic":
        from torchao.quantization import PerTensor

        return Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor())
    raise ValueError(f"no torchao config for {mode!r}")


def torchao_quantization_config(mode: str):
    """diffusers `TorchAoConfig` for `from_pretrained(..., quantization_config=...)` (block linears only)."""
    from diffusers import TorchAoConfig

    return TorchAoConfig(_torchao_config(mode), modules_to_not_convert=list(NOT_QUANTIZED))


def check_quantization_available(mode: str, device: str | torch.device) -> None:
    """Raise a clear `RuntimeError`, before any model loads, where `mode` cannot run on `device`: `fp8_dynamic`
    needs FP8 tensor cores (a CUDA GPU of compute capability 8.9+); the other modes run anywhere."""
    if mode != "fp8_dynamic":
        return
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9):
        return
    raise RuntimeError(
        "fp8_dynamic needs FP8 tensor cores (a CUDA GPU of compute capability 8.9+: Ada, Hopper); use "
        "fp8_weight_only or fp8_storage here"
    )


def quantize_transformer(transformer, mode: str, compute_dtype: torch.dtype = torch.bfloat16) -> None:
    """Put the transformer's block linear layers in FP8, in place.

    * `"fp8_weight_only"`: torchao float8 weights with per-channel scales, dequantised at each matmul (the
      original's `--low_vram` quantisation); half the weight memory, about 3-4% output error.
    * `"fp8_dynamic"`: torchao float8 weights and per-tensor float8 activations; runs on FP8 tensor cores
      (compute capability 8.9+) and is faster than bf16 only under `torch.compile`.
    * `"fp8_storage"`: diffusers layerwise casting: weights stored as float8_e4m3fn, cast to `compute_dtype` per
      layer (no torchao needed, no scales: coarser).
    """
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"quantization mode must be one of {QUANTIZATION_MODES}, got {mode!r}")
    if holds_quantized_weights(transformer):
        raise ValueError(
            f"quantize {mode!r}: the transformer already holds quantised weights (a GGUF or scaled-FP8 file); "
            "load it with keep_fp8=False to quantise it another way"
        )
    if mode == "fp8_storage":
        transformer.enable_layerwise_casting(
            storage_dtype=torch.float8_e4m3fn,
            compute_dtype=compute_dtype,
            skip_modules_pattern=tuple(transformer._skip_layerwise_casting_patterns) + NOT_QUANTIZED,
        )
        return
    try:
        from torchao.quantization import quantize_
    except ImportError as error:  # pragma: no cover - torchao is a pinned dependency
        raise ImportError(f"{mode} needs torchao (`pip install torchao`); use 'fp8_storage' without it") from error
    quantize_(transformer, _torchao_config(mode), filter_fn=_is_block_linear(transformer))


def apply_memory_mode(pipe, mode: str, device: str | torch.device = "cuda") -> None:
    """Place a pipeline on `device` with a memory preset.

    * `"resident"`: everything on the device.
    * `"offload"`: model CPU offload: one whole component on the device at a time (text encoder, image and audio
      encoders, transformer, VAE, in `model_cpu_offload_seq` order).
    * `"sequential"`: leaf-level CPU offload (least memory, slowest).
    * `"group"`: the transformer's and the text encoder's blocks stream from CPU one at a time (block-level group
      offload, next block prefetched on a CUDA stream); the small components (VAE, CLIP, wav2vec2) stay resident.
    * `"low_vram"`: `"group"` with FP8 transformer weights (torchao weight-only; a transformer loaded quantised,
      from GGUF or a scaled-FP8 file, is kept as it is) and VAE tiling.
    """
    if mode not in MEMORY_MODES:
        raise ValueError(f"memory mode must be one of {MEMORY_MODES}, got {mode!r}")
    device = torch.device(device)
    if mode == "resident" or device.type == "cpu":
        pipe.to(device)
        return
    if mode == "offload":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        if mode == "low_vram":
            if not holds_quantized_weights(pipe.transformer):  # a GGUF or FP8-file transformer is already small
                quantize_transformer(pipe.transformer, "fp8_weight_only")
            pipe.vae.enable_tiling(**LOW_VRAM_VAE_TILES)
        stream_large_components(pipe, device, use_stream=device.type == "cuda")


def streamed_modules(pipe) -> dict[str, torch.nn.Module]:
    """The modules whose blocks `"group"` / `"low_vram"` stream: the transformer and the text encoder's stack.

    diffusers' block-level group offload groups the `ModuleList`s that are direct children of the module it is given:
    given the whole UMT5 encoder (children `shared`, `encoder`) it would find none and move all 11 GB at once, without
    prefetch, at every call; its `encoder` stack holds the 24 blocks."""
    modules = {"transformer": pipe.transformer}
    text_encoder = getattr(pipe, "text_encoder", None)
    if text_encoder is not None:
        modules["text_encoder"] = getattr(text_encoder, "encoder", text_encoder)
    return modules


def stream_large_components(pipe, device: torch.device, use_stream: bool = True) -> None:
    """Block-level group offload of `streamed_modules(pipe)`; every other component moves to `device`."""
    from diffusers.hooks import apply_group_offloading

    streamed = streamed_modules(pipe)
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module) and name not in streamed:
            component.to(device)
    for module in streamed.values():
        apply_group_offloading(
            module,
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=use_stream,
            record_stream=use_stream,
        )


def fast_preset() -> dict:
    """`FAST_PRESET` with the first of `FAST_ATTENTION_BACKENDS` that can run here (the first one when none can:
    its check then names what is missing)."""
    from .models.attention_backends import attention_backend_available

    usable = [name for name in FAST_ATTENTION_BACKENDS if attention_backend_available(name)]
    return {**FAST_PRESET, "attention_backend": (usable or FAST_ATTENTION_BACKENDS)[0]}


def _execution_device(pipe) -> torch.device:
    device = getattr(pipe, "_execution_device", None)  # a pipeline (under offload: where the models run)
    if device is None:
        device = next(pipe.transformer.parameters()).device
    return torch.device(device)


def enable_fast_path(
    pipe, compile: bool = False, attention_backend: str | None = None, fullgraph: bool = True
) -> None:
    """Speed options: an attention backend and regional `torch.compile` of the repeated transformer blocks (fuses
    the float32 norm / modulation / RoPE chains; the first step pays the compilation).

    `attention_backend`: any diffusers backend (`"native"`, `"_native_cudnn"`, `"sage"`, ...) or ours: exact
    FlashAttention-3 `"fa3"`, the lossy `"fa3_fp8"`, `"triton_8bit"`, `"triton_8bit_accurate"`. None: `"fa3"` where
    the pipeline runs on a Hopper GPU with FlashAttention-3 installed (`models.attention_backends.
    default_attention_backend`), else diffusers' default (PyTorch SDPA's own choice, cuDNN on Hopper)."""
    from .models.attention_backends import check_attention_backend_available, default_attention_backend

    if attention_backend is None:
        attention_backend = default_attention_backend(_execution_device(pipe))
    else:
        check_attention_backend_available(attention_backend)
    if attention_backend is not None:
        pipe.transformer.set_attention_backend(attention_backend)
    if compile:
        pipe.transformer.compile_repeated_blocks(fullgraph=fullgraph)
