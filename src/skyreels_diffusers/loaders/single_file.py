"""Single-file loading of the transformer: `SkyReelsV3Transformer3DModel.from_single_file(...)`.

What users have: the original checkpoints as one file or shards (`*.safetensors`, `*.pth`; Wan-native keys for the
extension / shot-switching / talking-avatar transformers, diffusers-style keys for reference-to-video), the same
with ComfyUI's `model.diffusion_model.` prefix, community GGUF quantisations (city96's convert script and
llama.cpp's quantiser: `general.architecture = "wan"`, the original Wan-native tensor names, vectors and the
modulation tables in F32, the 5-D patch embedding added back in F32, linears in Q8_0 ... Q2_K, F16 or BF16), and
ComfyUI / kijai scaled-FP8 files (`*_fp8_scaled*.safetensors`: Wan-native names, FP8 linear weights each with a
float32 scale; `scaled_fp8.py`). FP8 linears stay FP8 (torchao weight-only, as the `fp8_weight_only` preset) unless
`keep_fp8=False` dequantises them.

The keys go through the converter's tables (`transformer.KEY_MAPS`, one source of truth), strictly: every key of
the model must come from the file and every key of the file must land in the model. GGUF linears stay quantised
(diffusers' `GGUFQuantizer` swaps them for `GGUFLinear`, dequantised on the fly in the compute dtype); GGUF tensors
that are not linear weights (the patch-embedding convolution, norms, modulation) are dequantised at load.

diffusers' own `FromOriginalModelMixin.from_single_file` cannot take this class: it resolves the class through
`getattr(diffusers, name)` for the names in `SINGLE_FILE_LOADABLE_CLASSES`, and this package's classes are not
attributes of `diffusers`. So the same steps are composed here from diffusers' public loading pieces
(`DiffusersAutoQuantizer`, `load_model_dict_into_meta`, accelerate's `init_empty_weights`), with the same keyword
arguments.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from .scaled_fp8 import (
    MARKER,
    assign_fp8_linears,
    safetensors_metadata,
    split_fp8_linears,
    split_fp8_scales,
)
from .tensor_io import safetensors_index
from .transformer_conversion import (
    KEY_MAPS,
    VARIANT_LAYOUT,
    VARIANT_MODEL_TYPE,
    check_mapped_keys,
    convert_config,
    expected_state_shapes,
    map_keys,
)


GGUF_ARCHITECTURES = ("wan",)
COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".pth", ".pt", ".bin", ".ckpt")
WAN_HEAD_DIM = 128  # every Wan2.1 / SkyReels-V3 size (1.3B: 12 heads x 128, 14B/19B: 40 heads x 128)


# --------------------------------------------------------------------------------------------- reading


def checkpoint_files(path: str | os.PathLike | list | tuple) -> list[Path]:
    """The weight files behind `path`: one file, a list of shards, a `*.index.json`, or a folder of shards."""
    if isinstance(path, (list, tuple)):
        files = [Path(p) for p in path]
    else:
        path = Path(path)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
            if any(p.suffix == ".safetensors" for p in files):
                files = [p for p in files if p.suffix == ".safetensors"]
        elif path.name.endswith(".index.json") and path.is_file():
            weight_map = json.loads(path.read_text())["weight_map"]
            files = [path.parent / name for name in sorted(set(weight_map.values()))]
        else:
            files = [path]
    if not files:
        raise FileNotFoundError(f"No weight files ({', '.join(WEIGHT_SUFFIXES)}) in {path}")
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {file}")
        if file.suffix not in WEIGHT_SUFFIXES:
            raise ValueError(f"{file}: unsupported checkpoint type {file.suffix!r}; expected one of {WEIGHT_SUFFIXES}")
    return files


def _gguf_field(reader, name: str):
    field = reader.get_field(name)
    if field is None:
        return None
    value = field.parts[field.data[-1]]
    return bytes(value).decode("utf-8") if value.dtype.kind == "u" and value.dtype.itemsize == 1 else value


def read_gguf(file: Path) -> dict[str, torch.Tensor]:
    """A community GGUF file -> state dict: F32/F16 tensors as plain tensors, quantised (and BF16) ones as
    diffusers `GGUFParameter`s (raw blocks, dequantised when used). Honours `comfy.gguf.orig_shape.*` metadata."""
    import gguf
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES, GGUFParameter

    try:
        reader = gguf.GGUFReader(str(file))
        tensors = list(reader.tensors)
    except (ValueError, IndexError, KeyError, OSError) as error:  # numpy's errors on a truncated / foreign file
        raise ValueError(f"{file} is not a readable GGUF file (truncated or corrupt?): {error}") from None
    architecture = _gguf_field(reader, "general.architecture")
    if architecture is not None and architecture not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"{file} is a GGUF file for architecture {architecture!r}; a SkyReels-V3 / Wan "
            f"transformer has {GGUF_ARCHITECTURES}"
        )
    plain = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    state = {}
    for tensor in tensors:
        kind = tensor.tensor_type
        if kind not in plain and kind not in SUPPORTED_GGUF_QUANT_TYPES:
            raise ValueError(
                f"{file}: tensor {tensor.name} has GGUF type {kind.name}, which diffusers cannot "
                f"dequantise (supported: F32, F16, {[t.name for t in SUPPORTED_GGUF_QUANT_TYPES]})"
            )
        data = torch.from_numpy(tensor.data.copy())
        orig_shape = reader.get_field(f"comfy.gguf.orig_shape.{tensor.name}")
        if kind in plain:
            if orig_shape is not None:
                data = data.reshape([int(orig_shape.parts[i][0]) for i in orig_shape.data])
            state[tensor.name] = data
        else:
            state[tensor.name] = GGUFParameter(data, quant_type=kind)
    return state


def _read_one(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".gguf":
        return read_gguf(file)
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            safetensors_index(file)  # header only: a truncated file names the first tensor it cuts
        except KeyError:  # a dtype the index does not know: safetensors itself reads (or refuses) the file
            pass
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{file} is not a readable safetensors file (damaged header: {error})") from None
        try:
            return load_file(str(file))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt?): {error}") from None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError) as error:
        raise ValueError(f"{file} is not a readable torch checkpoint: {error}") from None
    while isinstance(state, dict) and len(state) == 1 and next(iter(state)) in ("state_dict", "model", "module"):
        state = next(iter(state.values()))
    return state


def _strip_prefix(state: dict) -> dict:
    """ComfyUI's prefix removed when every key has it (a scaled-FP8 file's `scaled_fp8` marker may lack it)."""
    for prefix in COMFY_PREFIXES:
        keys = [key for key in state if key != MARKER]
        if keys and all(key.startswith(prefix) for key in keys):
            return {key.removeprefix(prefix): value for key, value in state.items()}
    return state


def read_checkpoint(files: list[Path]) -> dict[str, torch.Tensor]:
    """All tensors of the files (shards of one checkpoint), ComfyUI prefixes removed; a key in two files is an
    error."""
    state, where = {}, {}
    for file in files:
        for key, value in _strip_prefix(_read_one(file)).items():
            if key in state:
                raise ValueError(f"Key {key!r} appears in both {where[key]} and {file}")
            state[key], where[key] = value, file
    return state


# --------------------------------------------------------------------------------------------- variant, config


def tensor_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """Logical shape (a GGUF tensor's `quant_shape`, else its shape)."""
    return tuple(getattr(tensor, "quant_shape", tensor.shape))


def detect_variant(keys) -> str:
    """`"avatar"` (Wan keys with audio), `"extension"` (Wan keys), `"reference"` (diffusers keys)."""
    keys = set(keys)
    if any(key.startswith("audio_proj.") or ".audio_cross_attn." in key for key in keys):
        return "avatar"
    if "blocks.0.self_attn.q.weight" in keys:
        return "extension"
    if "blocks.0.attn1.to_q.weight" in keys:
        return "reference"
    raise ValueError(
        "Cannot tell the SkyReels-V3 variant from the checkpoint's keys (no 'blocks.0.self_attn.q.weight'"
        " or 'blocks.0.attn1.to_q.weight'); pass variant='reference'|'extension'|'avatar'"
    )


def _num_blocks(keys) -> int:
    return len({key.split(".")[1] for key in keys if key.startswith("blocks.")})


def infer_config(state: dict, variant: str) -> dict:
    """Our config from tensor shapes (head width 128, as in every Wan2.1 size; other fields the originals')."""
    shape = {key: tensor_shape(value) for key, value in state.items()}
    dim, in_dim, *patch = shape["patch_embedding.weight"]
    if dim % WAN_HEAD_DIM:
        raise ValueError(f"width {dim} is not a multiple of {WAN_HEAD_DIM}: pass config= (a config dict or folder)")
    if VARIANT_LAYOUT[variant] == "wan":
        original = {
            "model_type": VARIANT_MODEL_TYPE[variant],
            "patch_size": patch,
            "in_dim": in_dim,
            "dim": dim,
            "num_heads": dim // WAN_HEAD_DIM,
            "num_layers": _num_blocks(shape),
            "ffn_dim": shape["blocks.0.ffn.0.weight"][0],
            "freq_dim": shape["time_embedding.0.weight"][1],
            "text_dim": shape["text_embedding.0.weight"][1],
            "out_dim": shape["head.head.weight"][0] // math.prod(patch),
        }
        return convert_config(original, variant)
    original = {
        "patch_size": patch,
        "in_channels": in_dim,
        "num_attention_heads": dim // WAN_HEAD_DIM,
        "attention_head_dim": WAN_HEAD_DIM,
        "num_layers": _num_blocks(shape),
        "ffn_dim": shape["blocks.0.ffn.net.0.proj.weight"][0],
        "freq_dim": shape["condition_embedder.time_embedder.linear_1.weight"][1],
        "text_dim": shape["condition_embedder.text_embedder.linear_1.weight"][1],
        "out_channels": shape["proj_out.weight"][0] // math.prod(patch),
    }
    if "condition_embedder.image_embedder.ff.net.0.proj.weight" in shape:
        original["image_dim"] = shape["condition_embedder.image_embedder.ff.net.0.proj.weight"][1]
        original["added_kv_proj_dim"] = shape["blocks.0.attn2.add_k_proj.weight"][1]
    return convert_config(original, variant)


def resolve_config(model_class: type, config: Any, variant: str, state: dict) -> dict:
    """`config`: None (inferred from the tensors), our config dict, an original config dict, or a folder /
    `config.json` path holding either (a pipeline folder's `transformer/` is found too)."""
    if config is None:
        return infer_config(state, variant)
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        for candidate in (path, path / "config.json", path / "transformer" / "config.json"):
            if candidate.is_file():
                config = json.loads(candidate.read_text())
                break
        else:
            raise FileNotFoundError(f"config={str(path)!r}: no config.json there (nor in its transformer/)")
    if not isinstance(config, dict):
        raise TypeError(f"config must be None, a dict or a path, got {type(config).__name__}")
    ours = set(inspect.signature(model_class.__init__).parameters) - {"self"}
    fields = {k: v for k, v in config.items() if not k.startswith("_")}
    if config.get("_class_name") == model_class.__name__ or ("dim" not in fields and set(fields) <= ours):
        return fields
    return convert_config(config, variant)


# --------------------------------------------------------------------------------------------- loading


def convert_checkpoint(
    model_class: type, state: dict, variant: str, config: dict, what: str
) -> dict[str, torch.Tensor]:
    """Original keys -> ours through the converter's table, strictly, with every shape checked; a transformer of the
    other architecture (a talking-avatar file for a video pipeline, or the reverse) is named as such."""
    check_architecture(state, variant, what)
    try:
        mapped = map_keys(list(state), KEY_MAPS[VARIANT_LAYOUT[variant]])
    except KeyError as error:
        raise KeyError(f"{what}: {error.args[0]}") from None
    shapes = expected_state_shapes(model_class, config)
    check_mapped_keys(mapped, set(shapes), what, variant)
    converted = {item.target: item.take(state[item.source]) for item in mapped}
    wrong = {k: (tensor_shape(v), shapes[k]) for k, v in converted.items() if tensor_shape(v) != shapes[k]}
    if wrong:
        raise ValueError(f"{what}: tensor shapes do not fit the {variant!r} model (got, expected): {wrong}")
    return converted


#: model type -> what a user calls a transformer of it
ARCHITECTURE_NAMES = {
    "t2v": "a video transformer (reference-to-video / extension: no audio layers)",
    "i2v": "a talking-avatar transformer (with audio layers)",
}


def check_architecture(state: dict, variant: str, what: str) -> None:
    """Refuse, in one line, a checkpoint whose keys show the other SkyReels-V3 architecture than `variant`'s."""
    try:
        found = detect_variant(state)
    except ValueError:
        return  # no marker key: the strict key check names what is missing
    have, need = VARIANT_MODEL_TYPE[found], VARIANT_MODEL_TYPE[variant]
    if have != need:
        raise ValueError(
            f"{what} holds {ARCHITECTURE_NAMES[have]}; this pipeline needs {ARCHITECTURE_NAMES[need]} (a transformer "
            "file of another task)"
        )


def _dequantize_non_linear(model: torch.nn.Module, state: dict, shapes: dict) -> None:
    """GGUF tensors that will not sit in a `GGUFLinear` (convolutions, norms, tables) -> plain float32."""
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    for key, value in state.items():
        if not hasattr(value, "quant_type"):
            continue
        module_name, _, param = key.rpartition(".")
        if isinstance(model.get_submodule(module_name), torch.nn.Linear) and param == "weight":
            continue
        state[key] = dequantize_gguf_tensor(value).float().reshape(shapes[key])


def _read_source(path_or_dict) -> tuple[str, dict, dict]:
    """(what, state dict, safetensors metadata) of a path / shard list / state dict, ComfyUI prefixes removed."""
    if isinstance(path_or_dict, dict):
        return "state dict", _strip_prefix(dict(path_or_dict)), {}
    files = checkpoint_files(path_or_dict)
    return ", ".join(str(f) for f in files), read_checkpoint(files), safetensors_metadata(files)


#: a key that tells a file's naming: Wan-native or diffusers
LAYOUT_MARKERS = {"wan": "blocks.0.self_attn.q.weight", "diffusers": "blocks.0.attn1.to_q.weight"}
#: model type -> the variant whose key table reads each naming (reference-to-video and extension transformers share
#: one architecture, t2v)
VARIANT_OF_LAYOUT = {"t2v": {"wan": "extension", "diffusers": "reference"}}


def _variant_for_keys(variant: str, keys) -> str:
    """Reference-to-video and extension transformers share one architecture: a reference file saved with Wan-native
    names (as kijai's conversions are) loads through the Wan table, an extension file in diffusers names through the
    diffusers one."""
    keys = set(keys)
    layout = next((name for name, marker in LAYOUT_MARKERS.items() if marker in keys), None)
    return VARIANT_OF_LAYOUT.get(VARIANT_MODEL_TYPE.get(variant), {}).get(layout, variant)


def convert_scales(scales: dict, variant: str, what: str) -> dict[str, torch.Tensor]:
    """Scales keyed by original weight names -> by our names (a fused weight's per-row scale is split with it)."""
    if not scales:
        return {}
    try:
        mapped = map_keys(list(scales), KEY_MAPS[VARIANT_LAYOUT[variant]])
    except KeyError as error:
        raise KeyError(f"{what}: {error.args[0]}") from None
    return {m.target: m.take(scales[m.source]) if scales[m.source].ndim else scales[m.source] for m in mapped}


def load_transformer_single_file(
    cls,
    path_or_dict,
    variant: str | None = None,
    config: Any = None,
    torch_dtype: torch.dtype | None = None,
    quantization_config=None,
    device: str | torch.device | None = None,
    keep_fp8: bool = True,
    **unused,
):
    """See `SkyReelsV3SingleFileMixin.from_single_file` (`cls`: the model class)."""
    torch_dtype = unused.pop("dtype", None) or torch_dtype
    unused.pop("low_cpu_mem_usage", None)  # always low-memory (meta init)
    if unused:
        raise TypeError(f"from_single_file got unexpected keyword argument(s): {sorted(unused)}")
    if variant is not None and variant not in VARIANT_LAYOUT:
        raise ValueError(f"variant must be one of {sorted(VARIANT_LAYOUT)}, got {variant!r}")
    what, state, metadata = _read_source(path_or_dict)
    scales = split_fp8_scales(state, what, metadata, COMFY_PREFIXES)
    is_gguf = any(hasattr(v, "quant_type") for v in state.values())
    if is_gguf and quantization_config is None:
        raise ValueError(
            f"{what} holds GGUF-quantised tensors: pass quantization_config="
            "GGUFQuantizationConfig(compute_dtype=torch.bfloat16)"
        )
    if scales and quantization_config is not None:
        raise ValueError(f"{what} holds FP8 weights with their scales: quantization_config does not apply to it")
    try:
        variant = _variant_for_keys(variant, state) if variant else detect_variant(state)
    except ValueError as error:
        raise ValueError(f"{what}: {error}") from None
    try:
        model_config = resolve_config(cls, config, variant, state)
    except KeyError as error:
        raise KeyError(f"{what}: tensor {error.args[0]!r}, needed to infer the config, is missing") from None
    converted = convert_checkpoint(cls, state, variant, model_config, what)
    scales = convert_scales(scales, variant, what)
    del state
    if scales:  # FP8 files compute in bf16 unless told otherwise
        torch_dtype = torch_dtype or torch.bfloat16
    return _build_model(cls, model_config, converted, scales, torch_dtype, quantization_config, device, keep_fp8, what)


def _build_model(cls, model_config, converted, scales, torch_dtype, quantization_config, device, keep_fp8, what):
    """The model on the meta device, then every weight loaded (GGUF linears quantised, FP8 linears kept FP8 or
    dequantised); refuses to return a parameter left unloaded."""
    from accelerate import init_empty_weights
    from diffusers.models.model_loading_utils import load_model_dict_into_meta
    from diffusers.quantizers import DiffusersAutoQuantizer

    with init_empty_weights():
        model = cls.from_config(model_config)
    keep_in_fp32 = list(cls._keep_in_fp32_modules or [])
    fp8_linears = split_fp8_linears(model, converted, scales, keep_fp8)
    hf_quantizer = None
    if quantization_config is not None:
        hf_quantizer = DiffusersAutoQuantizer.from_config(quantization_config)
        hf_quantizer.validate_environment()
        torch_dtype = hf_quantizer.update_torch_dtype(torch_dtype)
        _dequantize_non_linear(model, converted, expected_state_shapes(cls, model_config))
        hf_quantizer.preprocess_model(
            model=model, device_map=None, state_dict=converted, keep_in_fp32_modules=keep_in_fp32
        )
    device = torch.device(device or "cpu")
    load_model_dict_into_meta(
        model,
        converted,
        dtype=torch_dtype,
        device_map={"": device},
        hf_quantizer=hf_quantizer,
        keep_in_fp32_modules=keep_in_fp32,
        unexpected_keys=[],
    )
    assign_fp8_linears(model, fp8_linears, torch_dtype, keep_in_fp32, device)
    if hf_quantizer is not None:
        hf_quantizer.postprocess_model(model)
        model.hf_quantizer = hf_quantizer
    left_on_meta = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if left_on_meta:  # cannot happen after the strict key check; never return random or empty weights
        raise RuntimeError(f"{what}: parameters left unloaded: {left_on_meta}")
    return model.eval()


class SkyReelsV3SingleFileMixin:
    """`from_single_file` for the transformer (the role of diffusers' `FromOriginalModelMixin`): the model class
    inherits it, so the loader never imports the model."""

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path_or_dict, **kwargs):
        """Load an original single-file or sharded checkpoint, or a community GGUF file, strictly.

        Args:
            pretrained_model_link_or_path_or_dict: a local `.safetensors` / `.pth` / `.gguf` file, a list of
                shards, a shard `*.index.json`, a folder of shards, or a state dict. Keys are the original ones
                (Wan-native for extension / avatar, diffusers-style for reference; a ComfyUI
                `model.diffusion_model.` prefix is removed), renamed with the converter's tables.
            variant (`str`, *optional*): `"reference"`, `"extension"` or `"avatar"`; detected from the keys if not
                given.
            config (*optional*): our config dict, an original `config.json` dict, or a folder / file holding one;
                inferred from the tensor shapes if not given (head width 128, as in every Wan2.1 size).
            torch_dtype (`torch.dtype`, *optional*): compute dtype (modules in `_keep_in_fp32_modules` stay fp32).
            quantization_config (*optional*): `GGUFQuantizationConfig(compute_dtype=torch.bfloat16)` for `.gguf`
                files: the linears stay quantised and are dequantised on the fly.
            device (*optional*): where to put the weights (default CPU).
            keep_fp8 (`bool`, defaults to True): scaled-FP8 files (kijai's / ComfyUI's `*_fp8_scaled*`): keep the
                FP8 linear weights in FP8 with the file's scales (torchao weight-only FP8, the compute path of the
                `fp8_weight_only` preset: about the file's size in memory); False dequantises every weight to
                `torch_dtype`. FP8 files compute in bfloat16 when `torch_dtype` is not given.

        Raises `KeyError` / `ValueError` naming the file and the missing, unexpected or misshapen keys, a GGUF
        file of another architecture, a truncated file (and the tensor it cuts), or, in a scaled-FP8 file, a
        missing scale, a scale beside a non-FP8 tensor or an unsupported quantisation format (naming the tensor);
        nothing is ever left randomly initialised.

        Example (a kijai FP8-scaled talking-avatar transformer, kept in FP8):

        ```py
        >>> transformer = SkyReelsV3Transformer3DModel.from_single_file(
        ...     "Wan21-SkyReelsV3-A2V_fp8_scaled_mixed.safetensors", torch_dtype=torch.bfloat16
        ... )
        ```
        """
        return load_transformer_single_file(cls, pretrained_model_link_or_path_or_dict, **kwargs)
