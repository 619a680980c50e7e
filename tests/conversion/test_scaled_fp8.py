"""Scaled-FP8 transformers (kijai's / ComfyUI's `*_fp8_scaled*` files) through `from_single_file`: kept FP8 with the
file's scales, or dequantised; strict about scales, formats, truncation and architecture."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from skyreels_diffusers.loaders.scaled_fp8 import quantize_to_fp8
from skyreels_diffusers.models import SkyReelsV3Transformer3DModel
from skyreels_diffusers.optimization import quantize_transformer
from tests.conversion.comfyui_files import scaled_fp8_state
from tests.helpers import GoldenCase, tiny_inputs


CASES = {"extension": "extension_fp32", "reference": "r2v_fp32", "avatar": "avatar_fp32"}


def _forward(model, inputs, dtype=torch.float32):
    with torch.no_grad():
        cast = {k: v.to(dtype) if v.is_floating_point() and k != "timestep" else v for k, v in inputs.items()}
        return model(**cast, return_dict=False)[0].float()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _write(tmp_path, name, state, metadata=None):
    path = tmp_path / name
    save_file(state, str(path), metadata=metadata or None)
    return path


def _golden(variant):
    case = GoldenCase(CASES[variant])
    return case, load_file(str(case.dir / "weights.safetensors"))


def _float8_names(model):
    return sorted(n for n, p in model.named_parameters() if type(p).__name__ == "Float8Tensor")


@pytest.mark.parametrize(
    "variant,layout,per_row",
    [
        ("extension", "kijai", False),
        ("reference", "comfy_quant", False),
        ("avatar", "kijai", True),  # per-row scales of the fused audio k/v weight are split with it
        ("avatar", "comfy_metadata", False),
    ],
)
def test_dequantised_equals_the_same_weights_loaded_the_usual_way(variant, layout, per_row, tmp_path):
    case, state = _golden(variant)
    config = case.meta["model_config"]
    file_state, metadata, reference = scaled_fp8_state(state, layout, per_row=per_row)
    path = _write(tmp_path, "m_fp8_scaled.safetensors", file_state, metadata)
    loaded = SkyReelsV3Transformer3DModel.from_single_file(
        path, config=config, torch_dtype=torch.float32, keep_fp8=False
    )
    expected = SkyReelsV3Transformer3DModel.from_single_file(reference, config=config, torch_dtype=torch.float32)
    assert not _float8_names(loaded)
    got = loaded.state_dict()
    for key, value in expected.state_dict().items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    inputs = tiny_inputs(loaded, variant)
    assert torch.equal(_forward(loaded, inputs), _forward(expected, inputs))


@pytest.mark.parametrize("variant", ["extension", "avatar"])
def test_kept_fp8_holds_the_files_bytes_and_runs_the_fp8_preset_path(variant, tmp_path):
    case, state = _golden(variant)
    config = case.meta["model_config"]
    file_state, _, reference = scaled_fp8_state(state, "kijai", other_dtype=torch.float32)
    path = _write(tmp_path, "m.safetensors", file_state)
    kept = SkyReelsV3Transformer3DModel.from_single_file(path, config=config, torch_dtype=torch.float32)
    names = _float8_names(kept)
    assert names and all(n.startswith("blocks.") for n in names)
    # the very FP8 bytes and scales of the file, no dequantise / re-quantise round trip
    q = kept.blocks[0].attn1.to_q.weight
    assert torch.equal(q.qdata.view(torch.uint8), file_state["blocks.0.self_attn.q.weight"].view(torch.uint8))
    assert torch.equal(q.scale.reshape(()), file_state["blocks.0.self_attn.q.scale_weight"])
    # float32 compute: the weight-only path is the dequantised weights' matmul
    expected = SkyReelsV3Transformer3DModel.from_single_file(reference, config=config, torch_dtype=torch.float32)
    inputs = tiny_inputs(kept, variant)
    assert _rel(_forward(kept, inputs), _forward(expected, inputs)) < 1e-5
    # bf16 compute against the float model: within the error of the fp8_weight_only preset on the same weights
    original = SkyReelsV3Transformer3DModel.from_single_file(state, config=config, torch_dtype=torch.float32)
    truth = _forward(original, inputs)
    kept_bf16 = SkyReelsV3Transformer3DModel.from_single_file(path, config=config, torch_dtype=torch.bfloat16)
    assert _float8_names(kept_bf16) == names
    preset = SkyReelsV3Transformer3DModel.from_single_file(state, config=config, torch_dtype=torch.bfloat16)
    quantize_transformer(preset, "fp8_weight_only")
    ours, theirs = _rel(_forward(kept_bf16, inputs, torch.bfloat16), truth), _rel(_forward(preset, inputs), truth)
    assert 0 < ours < 1.5 * theirs, (ours, theirs)  # per-tensor scales (the file's) vs the preset's per-row


def test_shards_prefix_and_marker_without_prefix(tmp_path):
    """ComfyUI's `model.diffusion_model.` prefix (its `scaled_fp8` marker written bare), a scale in another shard
    than its weight."""
    case, state = _golden("extension")
    file_state, _, reference = scaled_fp8_state(state, "kijai", prefix="model.diffusion_model.")
    keys = sorted(file_state)
    first = {k: file_state[k] for k in keys if "scale_weight" in k or k == "scaled_fp8"}
    rest = {k: v for k, v in file_state.items() if k not in first}
    files = [_write(tmp_path, "a.safetensors", first), _write(tmp_path, "b.safetensors", rest)]
    config = case.meta["model_config"]
    loaded = SkyReelsV3Transformer3DModel.from_single_file(files, config=config, keep_fp8=False)
    assert loaded.dtype == torch.bfloat16  # FP8 files compute in bf16 unless told otherwise
    expected = SkyReelsV3Transformer3DModel.from_single_file(reference, config=config, torch_dtype=torch.bfloat16)
    for key, value in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_reference_file_with_wan_native_names_loads_as_asked(tmp_path):
    """kijai's reference-to-video files carry Wan-native names: `variant="reference"` still loads them."""
    case, _ = _golden("extension")
    file_state, _, reference = scaled_fp8_state(load_file(str(case.dir / "weights.safetensors")), "kijai")
    path = _write(tmp_path, "r2v.safetensors", file_state)
    config = case.meta["model_config"]
    loaded = SkyReelsV3Transformer3DModel.from_single_file(path, variant="reference", config=config, keep_fp8=False)
    expected = SkyReelsV3Transformer3DModel.from_single_file(reference, config=config, torch_dtype=torch.bfloat16)
    assert torch.equal(loaded.blocks[1].ffn.net[2].weight, expected.blocks[1].ffn.net[2].weight)


def test_plain_fp8_file_without_scales_loads_with_scale_one(tmp_path):
    case, state = _golden("extension")
    plain = {k: v.to(torch.float8_e4m3fn) if k.endswith("ffn.0.weight") else v for k, v in state.items()}
    path = _write(tmp_path, "fp8_e4m3fn.safetensors", plain)
    loaded = SkyReelsV3Transformer3DModel.from_single_file(path, config=case.meta["model_config"], keep_fp8=False)
    assert torch.equal(loaded.blocks[0].ffn.net[0].proj.weight, plain["blocks.0.ffn.0.weight"].to(torch.bfloat16))


def _bad_file(tmp_path, change: str):
    case, state = _golden("extension")
    file_state, metadata, _ = scaled_fp8_state(state, "comfy_quant" if change == "nvfp4" else "kijai")
    if change == "missing scale":
        del file_state["blocks.1.cross_attn.o.scale_weight"]
    elif change == "scale beside a bf16 tensor":
        file_state["blocks.0.norm3.scale_weight"] = torch.tensor(0.5)
    elif change == "scale without weight":
        file_state["blocks.0.self_attn.x.scale_weight"] = torch.tensor(0.5)
    elif change == "scale shape":
        file_state["blocks.0.ffn.2.scale_weight"] = torch.ones(3)
    elif change == "nvfp4":
        file_state["blocks.0.ffn.2.comfy_quant"] = torch.tensor(list(json.dumps({"format": "nvfp4"}).encode()))
    elif change == "wrong architecture":
        q, scale = quantize_to_fp8(torch.randn(64, 64))
        file_state["blocks.0.cross_attn.k_img.weight"], file_state["blocks.0.cross_attn.k_img.scale_weight"] = q, scale
    return case, _write(tmp_path, "bad.safetensors", file_state, metadata)


@pytest.mark.parametrize(
    "change,error,names",
    [
        ("missing scale", ValueError, "blocks.1.cross_attn.o.weight has no scale"),
        ("scale beside a bf16 tensor", ValueError, "blocks.0.norm3.scale_weight sits beside blocks.0.norm3.weight"),
        ("scale without weight", ValueError, "blocks.0.self_attn.x.scale_weight has no weight"),
        ("scale shape", ValueError, "scale blocks.0.ffn.2.scale_weight has shape (3,)"),
        ("nvfp4", ValueError, "layer blocks.0.ffn.2 is stored as 'nvfp4'"),
        ("wrong architecture", KeyError, "blocks.0.attn2.add_k_proj.weight"),
    ],
)
def test_bad_scaled_fp8_files_name_the_tensor(change, error, names, tmp_path):
    case, path = _bad_file(tmp_path, change)
    with pytest.raises(error, match="bad.safetensors") as info:
        SkyReelsV3Transformer3DModel.from_single_file(path, config=case.meta["model_config"])
    assert names in str(info.value)


def test_truncated_scaled_fp8_file_names_the_cut_tensor(tmp_path):
    case, state = _golden("extension")
    file_state, _, _ = scaled_fp8_state(state, "kijai")
    good = _write(tmp_path, "good.safetensors", file_state)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size - 100])
    with pytest.raises(ValueError, match=r"cut\.safetensors is truncated: tensor '.+' ends at byte"):
        SkyReelsV3Transformer3DModel.from_single_file(cut, config=case.meta["model_config"])


def test_quantization_config_is_refused_for_fp8_files(tmp_path):
    from diffusers import GGUFQuantizationConfig

    case, state = _golden("extension")
    path = _write(tmp_path, "m.safetensors", scaled_fp8_state(state)[0])
    with pytest.raises(ValueError, match="quantization_config does not apply"):
        SkyReelsV3Transformer3DModel.from_single_file(
            path, config=case.meta["model_config"], quantization_config=GGUFQuantizationConfig()
        )


def test_presets_do_not_quantise_an_fp8_file_again(tmp_path):
    from skyreels_diffusers.optimization import holds_quantized_weights

    case, state = _golden("extension")
    path = _write(tmp_path, "m.safetensors", scaled_fp8_state(state)[0])
    kept = SkyReelsV3Transformer3DModel.from_single_file(path, config=case.meta["model_config"])
    assert holds_quantized_weights(kept)
    with pytest.raises(ValueError, match="already holds quantised weights"):
        quantize_transformer(kept, "fp8_weight_only")
    dequantised = SkyReelsV3Transformer3DModel.from_single_file(path, config=case.meta["model_config"], keep_fp8=False)
    assert not holds_quantized_weights(dequantised)
