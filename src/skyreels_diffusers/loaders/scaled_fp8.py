"""Scaled-FP8 checkpoints, as ComfyUI and kijai's WanVideoWrapper write them: FP8 weights, each with a float32 scale.

The dequantised weight is `fp8.float() * scale`. Two layouts exist (both read here, with or without ComfyUI's
`model.diffusion_model.` prefix):

* "scaled_fp8" (kijai's `*_fp8_scaled*.safetensors`, ComfyUI's older `*_fp8_scaled.safetensors`): a `scaled_fp8`
  marker tensor (its dtype is the FP8 dtype of the file) and, beside each FP8 weight, `<layer>.scale_weight` (one
  float32 value); optionally `<layer>.scale_input`, an activation scale for FP8 matmuls.
* ComfyUI's mixed-precision layout: `<layer>.weight_scale` (and optionally `<layer>.input_scale`) beside each FP8
  weight, and the layer's format as a `<layer>.comfy_quant` tensor (JSON bytes, e.g. `{"format": "float8_e4m3fn"}`)
  or in the safetensors metadata `_quantization_metadata` (`{"layers": {layer: {"format": ...}}}`).

Scales of one value per tensor and of one value per output row are read. Input scales only set the range of FP8
activations in ComfyUI's FP8-matmul mode; weight-only FP8 (what is built here) does not quantise activations, so they
are checked and dropped. Formats other than FP8 (NVFP4, INT8, MXFP8, block-wise FP8) are refused by name.

FP8 linear weights can stay FP8 on the device as torchao `Float8Tensor`s built from the file's bytes and scales (no
dequantise / re-quantise round trip): the class and weight-only compute path of the `fp8_weight_only` preset
(`optimization.quantize_transformer`), where each matmul runs on the weight dequantised to the compute dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
MARKER = "scaled_fp8"
WEIGHT_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
INPUT_SCALE_SUFFIXES = (".scale_input", ".input_scale")
LAYER_FORMAT_SUFFIX = ".comfy_quant"
METADATA_KEY = "_quantization_metadata"
#: ComfyUI layer formats that are one FP8 tensor with a per-tensor or per-row scale
FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fn_rowwise", "float8_e5m2_rowwise")


def is_fp8(tensor) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.dtype in FP8_DTYPES


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    for prefix in prefixes:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _layer_formats(state: dict, metadata: dict | None, prefixes: tuple[str, ...], what: str) -> dict[str, dict]:
    """{layer: its ComfyUI quantisation config}, from `<layer>.comfy_quant` tensors (removed) and the metadata."""
    layers = {}
    if metadata and METADATA_KEY in metadata:
        try:
            layers.update(json.loads(metadata[METADATA_KEY])["layers"])
        except (TypeError, KeyError, ValueError) as error:
            raise ValueError(f"{what}: unreadable {METADATA_KEY} metadata ({error})") from None
    for key in [k for k in state if k.endswith(LAYER_FORMAT_SUFFIX)]:
        tensor = state.pop(key)
        try:
            layers[key[: -len(LAYER_FORMAT_SUFFIX)]] = json.loads(bytes(tensor.to(torch.uint8).tolist()).decode())
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"{what}: tensor {key} is not a JSON layer format ({error})") from None
    layers = {_strip(layer, prefixes): conf for layer, conf in layers.items()}
    for layer, conf in layers.items():
        name = conf.get("format") if isinstance(conf, dict) else None
        if name not in FP8_FORMATS:
            raise ValueError(
                f"{what}: layer {layer} is stored as {name!r}; only scaled FP8 layers ({', '.join(FP8_FORMATS)}) "
                "can be read (NVFP4, INT8, MXFP8 and block-wise files are not supported)"
            )
    return layers


def _check_scale(scale: torch.Tensor, weight: torch.Tensor, key: str, what: str) -> torch.Tensor:
    """One float32 value, or one per output row (shape `[out]` or `[out, 1]`), finite and positive."""
    rows = weight.shape[0] if weight.ndim else 1
    if scale.numel() == 1:
        scale = scale.reshape(())
    elif scale.numel() == rows and weight.ndim >= 2 and scale.ndim <= 2 and scale.shape[0] == rows:
        scale = scale.reshape(rows)
    else:
        raise ValueError(
            f"{what}: scale {key} has shape {tuple(scale.shape)}; expected one value or one per row of "
            f"its weight {tuple(weight.shape)}"
        )
    scale = scale.float()
    if not torch.isfinite(scale).all() or not (scale > 0).all():
        raise ValueError(f"{what}: scale {key} holds a non-finite or non-positive value")
    return scale


def split_fp8_scales(
    state: dict[str, torch.Tensor], what: str, metadata: dict | None = None, prefixes: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """Remove a scaled-FP8 checkpoint's bookkeeping tensors from `state` (in place) and return the scale of each FP8
    tensor: `{weight key: float32 scale}` (shape `()` or `[out]`). A file without FP8 tensors gives `{}`.

    Strict: a scale beside a non-FP8 tensor or beside no tensor, an FP8 tensor without a scale in a scaled file,
    a malformed scale and a non-FP8 layer format each raise a `ValueError` naming the tensor. FP8 tensors of a file
    with no scale at all (plain `fp8_e4m3fn` files) get scale 1.
    """
    marker = state.pop(MARKER, None)
    layers = _layer_formats(state, metadata, prefixes, what)
    scales, input_scales = {}, {}
    for key in list(state):
        for suffix in WEIGHT_SCALE_SUFFIXES:
            if key.endswith(suffix):
                scales[key[: -len(suffix)] + ".weight"] = (key, state.pop(key))
        for suffix in INPUT_SCALE_SUFFIXES:
            if key.endswith(suffix):
                input_scales[key[: -len(suffix)] + ".weight"] = key
                state.pop(key)
    checked = {}
    for weight_key, (scale_key, scale) in scales.items():
        if weight_key not in state:
            raise ValueError(f"{what}: scale {scale_key} has no weight {weight_key} beside it")
        weight = state[weight_key]
        if not is_fp8(weight):
            raise ValueError(
                f"{what}: scale {scale_key} sits beside {weight_key}, which is {weight.dtype}, not FP8 "
                "(a damaged or mis-converted file)"
            )
        checked[weight_key] = _check_scale(scale, weight, scale_key, what)
    for weight_key, key in input_scales.items():
        if weight_key not in checked:
            raise ValueError(f"{what}: input scale {key} belongs to no scaled FP8 weight")
    for layer in layers:
        if f"{layer}.weight" not in checked:
            raise ValueError(f"{what}: layer {layer} is declared FP8 but has no weight scale ({layer}.weight_scale)")
    scaled = marker is not None or bool(checked) or bool(layers)
    for key, tensor in state.items():
        if is_fp8(tensor) and key not in checked:
            if scaled:
                raise ValueError(
                    f"{what}: FP8 tensor {key} has no scale ({key.removesuffix('.weight')}.scale_weight or "
                    ".weight_scale); the file is incomplete or damaged"
                )
            checked[key] = torch.ones((), dtype=torch.float32)
    return checked


def safetensors_metadata(files: list[Path]) -> dict[str, str]:
    """The `__metadata__` of safetensors files (header only), merged."""
    import struct

    metadata = {}
    for file in files:
        if Path(file).suffix != ".safetensors":
            continue
        with open(file, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                continue  # the reader reports the damaged file
            (length,) = struct.unpack("<Q", head)
            try:
                header = json.loads(handle.read(length))
            except (ValueError, UnicodeDecodeError, MemoryError):
                continue
        metadata.update(header.get("__metadata__") or {})
    return metadata


def _broadcast(scale: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return scale.reshape(-1, *([1] * (weight.ndim - 1))) if scale.ndim else scale


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`weight.float() * scale` in `dtype` (exact in float32: an FP8 value times a float32 scale)."""
    return (weight.float() * _broadcast(scale.to(weight.device), weight)).to(dtype)


def float8_weight(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, device=None):
    """A torchao `Float8Tensor` (weight-only: bf16/fp32 activations) holding the file's FP8 bytes and scale."""
    try:
        from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor
    except ImportError as error:
        raise ImportError(
            "Keeping FP8 weights in FP8 needs torchao (pip install 'skyreels-diffusers[quant]'); "
            "or load with keep_fp8=False to dequantise them"
        ) from error
    out_features, in_features = weight.shape
    if scale.ndim:
        scale, block = scale.reshape(out_features, 1), [1, in_features]
    else:
        scale, block = scale.reshape(1, 1), [out_features, in_features]
    device = device if device is not None else weight.device
    return Float8Tensor(weight.to(device), scale.to(device), block_size=block, dtype=dtype)


def module_dtype(name: str, dtype: torch.dtype, keep_in_fp32: list[str] | tuple[str, ...]) -> torch.dtype:
    """The dtype a parameter is loaded in (diffusers' rule: a name part in `_keep_in_fp32_modules` -> float32)."""
    return torch.float32 if set(name.split(".")) & set(keep_in_fp32) else dtype


def split_fp8_linears(
    model: torch.nn.Module, state: dict[str, torch.Tensor], scales: dict[str, torch.Tensor], keep_fp8: bool
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Dequantise, in `state` (to float32), the FP8 tensors that will not stay FP8, and take out the FP8 linear
    weights that will: `{param name: (fp8 weight, scale)}` (all of them 2-D `nn.Linear` weights)."""
    kept = {}
    for key, scale in scales.items():
        module_name, _, param = key.rpartition(".")
        is_linear = param == "weight" and isinstance(model.get_submodule(module_name), torch.nn.Linear)
        if keep_fp8 and is_linear:
            kept[key] = (state.pop(key), scale)
        else:
            state[key] = dequantize_fp8(state[key], scale)
    return kept


def assign_fp8_linears(
    model: torch.nn.Module,
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]],
    dtype: torch.dtype,
    keep_in_fp32=(),
    device=None,
) -> None:
    """Set each `{param name: (fp8 weight, scale)}` as a torchao `Float8Tensor` parameter (compute in `dtype`, or
    float32 inside `keep_in_fp32` modules)."""
    for key, (weight, scale) in weights.items():
        module_name, _, param = key.rpartition(".")
        value = float8_weight(weight, scale, module_dtype(key, dtype, keep_in_fp32), device)
        setattr(model.get_submodule(module_name), param, torch.nn.Parameter(value, requires_grad=False))


def quantize_to_fp8(
    weight: torch.Tensor, per_row: bool = False, dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 weight, float32 scale) as the scaled-FP8 files hold them: `scale = amax / fp8 max` per tensor (shape
    `()`) or per output row (shape `[out]`), `fp8 = (weight / scale).to(dtype)`."""
    weight = weight.float()
    amax = weight.abs().amax(dim=tuple(range(1, weight.ndim))) if per_row else weight.abs().amax()
    scale = (amax / torch.finfo(dtype).max).clamp(min=torch.finfo(torch.float32).tiny)
    return (weight / _broadcast(scale, weight)).to(dtype), scale
