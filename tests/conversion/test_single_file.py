"""`from_single_file`: original single-file / sharded checkpoints, community GGUF files, the original Wan VAE."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan, GGUFQuantizationConfig
from diffusers.quantizers.gguf.utils import GGUFLinear, dequantize_gguf_tensor
from safetensors.torch import load_file, save_file

from skyreels_diffusers.app.convert import convert_transformer
from skyreels_diffusers.models import SkyReelsV3Transformer3DModel
from tests.conversion.community_files import T, wan_native_state, write_community_gguf
from tests.helpers import GoldenCase, tiny_inputs


GOLDEN_VAE = Path(__file__).resolve().parents[1] / "fixtures" / "pipelines" / "vae"
FP32 = GGUFQuantizationConfig(compute_dtype=torch.float32)
# a width-256 extension model (2 heads x 128, as in every real size): every linear fits 256-wide K-quant blocks
WIDE = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 256,
    "freq_dim": 256,
    "ffn_dim": 512,
    "num_layers": 1,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
}


def _forward(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def wide():
    torch.manual_seed(0)
    model = SkyReelsV3Transformer3DModel(**WIDE).eval()
    return model, wan_native_state(model), tiny_inputs(model, "extension")


@pytest.mark.parametrize("name", ["extension_fp32", "r2v_fp32", "avatar_fp32"])
def test_single_file_equals_the_converted_folder(name, tmp_path):
    """Same tables as the converter: identical weights; the variant is told from the keys."""
    case = GoldenCase(name)
    original = case.write_original_folder(tmp_path / "o")
    convert_transformer(original, tmp_path / "c", case.variant, dtype=torch.float32)
    expected = SkyReelsV3Transformer3DModel.from_pretrained(tmp_path / "c", torch_dtype=torch.float32).state_dict()
    model = SkyReelsV3Transformer3DModel.from_single_file(
        original / "model.safetensors", config=original, torch_dtype=torch.float32
    )
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key


def test_shards_pth_and_comfy_prefix(tmp_path):
    case = GoldenCase("extension_fp32")
    state = load_file(str(case.dir / "weights.safetensors"))
    keys = sorted(state)
    prefixed = {f"model.diffusion_model.{k}": v.float() for k, v in state.items()}
    half = len(keys) // 2
    save_file(
        {f"model.diffusion_model.{k}": prefixed[f"model.diffusion_model.{k}"] for k in keys[:half]},
        str(tmp_path / "a.safetensors"),
    )
    save_file(
        {f"model.diffusion_model.{k}": prefixed[f"model.diffusion_model.{k}"] for k in keys[half:]},
        str(tmp_path / "b.safetensors"),
    )
    torch.save(prefixed, tmp_path / "whole.pth")
    config = case.meta["model_config"]
    shards = SkyReelsV3Transformer3DModel.from_single_file(
        [tmp_path / "a.safetensors", tmp_path / "b.safetensors"], config=config, torch_dtype=torch.float32
    )
    pth = SkyReelsV3Transformer3DModel.from_single_file(
        tmp_path / "whole.pth", config=config, torch_dtype=torch.float32
    )
    for key, value in shards.state_dict().items():
        assert torch.equal(value, pth.state_dict()[key]), key


def test_config_inferred_from_shapes(wide):
    _, wan, _ = wide
    loaded = SkyReelsV3Transformer3DModel.from_single_file(wan, torch_dtype=torch.float32)
    for field, value in WIDE.items():
        got = loaded.config[field]
        assert (list(got) if isinstance(got, (list, tuple)) else got) == (
            list(value) if isinstance(value, tuple) else value
        ), field


@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_single_file_is_strict_and_names_the_file(change, tmp_path):
    case = GoldenCase("extension_fp32")
    state = load_file(str(case.dir / "weights.safetensors"))
    if change == "missing":
        del state["blocks.1.ffn.2.weight"]
    elif change == "extra":
        state["blocks.0.extra.weight"] = torch.zeros(2)
    else:
        state["blocks.0.ffn.2.weight"] = state["blocks.0.ffn.2.weight"][:, :-1].contiguous()
    save_file(state, str(tmp_path / "bad.safetensors"))
    error = ValueError if change == "shape" else KeyError
    with pytest.raises(error, match="bad.safetensors") as info:
        SkyReelsV3Transformer3DModel.from_single_file(tmp_path / "bad.safetensors", config=case.meta["model_config"])
    assert {
        "missing": "blocks.1.ffn.net.2.weight",
        "extra": "blocks.0.extra.weight",
        "shape": "blocks.0.ffn.net.2.weight",
    }[change] in str(info.value)


def test_checkpoint_of_another_model_is_rejected_naming_the_file(tmp_path):
    save_file({"double_blocks.0.img_attn.proj.weight": torch.zeros(4, 4)}, str(tmp_path / "flux.safetensors"))
    with pytest.raises(ValueError, match=r"flux\.safetensors.*variant"):
        SkyReelsV3Transformer3DModel.from_single_file(tmp_path / "flux.safetensors")


# quant type -> bound on the output error of the file against the float model (real quantisation; None: K-quant
# files hold random blocks, compared only against their own decoded weights)
GGUF_TYPES = {
    T.Q8_0: 0.01,
    T.Q5_0: 0.06,
    T.Q4_0: 0.12,
    T.BF16: 0.005,
    T.F16: 0.001,
    T.Q4_K: None,
    T.Q5_K: None,
    T.Q6_K: None,
}


@pytest.mark.parametrize("qtype", list(GGUF_TYPES), ids=lambda t: t.name)
def test_gguf_stays_quantised_and_matches_its_dequantised_weights(qtype, wide, tmp_path):
    model, wan, inputs = wide
    decoded = write_community_gguf(tmp_path / f"m-{qtype.name}.gguf", wan, qtype)
    loaded = SkyReelsV3Transformer3DModel.from_single_file(tmp_path / f"m-{qtype.name}.gguf", quantization_config=FP32)
    linears = [m for m in loaded.modules() if isinstance(m, GGUFLinear)]
    if qtype == T.F16:  # plain torch dtype: ordinary linears
        assert not linears
    else:  # every linear but the fp32-kept time embedding / projection stays in the file's blocks
        assert len(linears) == 13 and all(m.weight.quant_type == qtype for m in linears)
    reference = SkyReelsV3Transformer3DModel.from_single_file(decoded, torch_dtype=torch.float32)
    out = _forward(loaded, inputs)
    assert _rel(out, _forward(reference, inputs)) < 2e-3  # GGUF scales are fp16: dequantised in half precision
    if GGUF_TYPES[qtype] is not None:
        assert _rel(out, _forward(model, inputs)) < GGUF_TYPES[qtype]


def test_gguf_avatar_loads_with_its_fused_kv_split(tmp_path):
    """The avatar's Wan-native audio `kv_linear` is split into `to_k` / `to_v` from the GGUF tensors too."""
    case = GoldenCase("avatar_fp32")
    state = load_file(str(case.dir / "weights.safetensors"))
    decoded = write_community_gguf(tmp_path / "avatar.gguf", state, T.Q8_0)
    config = case.meta["model_config"]
    loaded = SkyReelsV3Transformer3DModel.from_single_file(
        tmp_path / "avatar.gguf", config=config, quantization_config=FP32
    )
    reference = SkyReelsV3Transformer3DModel.from_single_file(decoded, config=config, torch_dtype=torch.float32)
    assert sum(isinstance(m, GGUFLinear) for m in loaded.modules()) > 0
    expected = reference.state_dict()
    for name, module in loaded.named_modules():
        if isinstance(module, torch.nn.Linear):
            weight = dequantize_gguf_tensor(module.weight).float()
            torch.testing.assert_close(weight, expected[f"{name}.weight"], rtol=1e-3, atol=1e-4, msg=name)


def test_bad_gguf_files_give_clear_errors(wide, tmp_path):
    _, wan, _ = wide
    good = tmp_path / "good.gguf"
    write_community_gguf(good, wan, T.Q8_0)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.gguf"):
        SkyReelsV3Transformer3DModel.from_single_file(truncated, quantization_config=FP32)
    write_community_gguf(tmp_path / "flux.gguf", wan, T.Q8_0, architecture="flux")
    with pytest.raises(ValueError, match=r"flux\.gguf.*'flux'"):
        SkyReelsV3Transformer3DModel.from_single_file(tmp_path / "flux.gguf", quantization_config=FP32)
    write_community_gguf(
        tmp_path / "missing.gguf", {k: v for k, v in wan.items() if k != "blocks.0.cross_attn.o.weight"}, T.Q8_0
    )
    with pytest.raises(KeyError, match=r"missing\.gguf.*blocks\.0\.attn2\.to_out\.0\.weight"):
        SkyReelsV3Transformer3DModel.from_single_file(tmp_path / "missing.gguf", quantization_config=FP32)
    with pytest.raises(ValueError, match="quantization_config"):
        SkyReelsV3Transformer3DModel.from_single_file(good)
    with pytest.raises(FileNotFoundError, match="nowhere.gguf"):
        SkyReelsV3Transformer3DModel.from_single_file(tmp_path / "nowhere.gguf", quantization_config=FP32)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_wan_vae_from_the_original_file(suffix, tmp_path):
    """diffusers' own `AutoencoderKLWan.from_single_file` reads `Wan2.1_VAE.pth`-layout files (given the config)."""
    meta = json.loads((GOLDEN_VAE / "vae.json").read_text())
    AutoencoderKLWan(**meta["diffusers_config"]).save_config(tmp_path / "vae")
    original = load_file(str(GOLDEN_VAE / "vae_original.safetensors"))
    path = tmp_path / f"Wan2.1_VAE{suffix}"
    if suffix == ".pth":
        torch.save(original, path)
    else:
        shutil.copy(GOLDEN_VAE / "vae_original.safetensors", path)
    vae = AutoencoderKLWan.from_single_file(str(path), config=str(tmp_path / "vae"), torch_dtype=torch.float32)
    expected = load_file(str(GOLDEN_VAE / "vae_diffusers.safetensors"))
    got = vae.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value.float()), key
