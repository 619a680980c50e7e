"""The transformer converter: key tables, strictness, sharding, configs, `.pth` input and the script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from skyreels_diffusers.app.convert import convert_transformer
from skyreels_diffusers.loaders import WAN_NATIVE_KEY_MAP, convert_config, map_keys
from skyreels_diffusers.models import SkyReelsV3Transformer3DModel
from tests.helpers import GoldenCase


ROOT = Path(__file__).resolve().parents[2]


def test_every_wan_key_maps_and_kv_is_split():
    mapped = map_keys(
        ["blocks.3.audio_cross_attn.kv_linear.weight", "blocks.0.norm3.bias", "head.modulation"], WAN_NATIVE_KEY_MAP
    )
    assert [(m.target, m.chunk, m.num_chunks) for m in mapped] == [
        ("blocks.3.attn_audio.to_k.weight", 0, 2),
        ("blocks.3.attn_audio.to_v.weight", 1, 2),
        ("blocks.0.norm2.bias", 0, 1),
        ("scale_shift_table", 0, 1),
    ]
    with pytest.raises(KeyError, match="blocks.0.unknown.weight"):
        map_keys(["blocks.0.unknown.weight"], WAN_NATIVE_KEY_MAP)


def test_avatar_kv_split_values(tmp_path):
    case = GoldenCase("avatar_fp32")
    convert_transformer(case.write_original_folder(tmp_path / "o"), tmp_path / "c", "avatar")
    converted = load_file(str(tmp_path / "c" / "diffusion_pytorch_model.safetensors"))
    original = load_file(str(case.dir / "weights.safetensors"))
    kv = original["blocks.1.audio_cross_attn.kv_linear.weight"]
    half = kv.shape[0] // 2
    assert torch.equal(converted["blocks.1.attn_audio.to_k.weight"], kv[:half])
    assert torch.equal(converted["blocks.1.attn_audio.to_v.weight"], kv[half:])


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_missing_or_extra_original_key_fails_and_writes_nothing(change, tmp_path):
    case = GoldenCase("extension_fp32")
    original = case.write_original_folder(tmp_path / "o")
    state = load_file(str(original / "model.safetensors"))
    if change == "missing":
        del state["blocks.1.cross_attn.norm_k.weight"]
        expected = "blocks.1.attn2.norm_k.weight"
    else:
        state["blocks.0.cross_attn.k_img.weight"] = torch.zeros(64, 64, dtype=torch.bfloat16)
        expected = "blocks.0.attn2.add_k_proj.weight"
    save_file(state, str(original / "model.safetensors"))
    with pytest.raises(KeyError, match=rf"{change} keys \[[^\]]*'{expected}'"):
        convert_transformer(original, tmp_path / "c", "extension")
    assert not (tmp_path / "c").exists()


def test_sharded_output_and_dtype(tmp_path):
    case = GoldenCase("extension_fp32")
    original = case.write_original_folder(tmp_path / "o")
    convert_transformer(original, tmp_path / "one", "extension", dtype=torch.float32)
    convert_transformer(original, tmp_path / "many", "extension", dtype=torch.float32, max_shard_size="50KB")
    shards = sorted((tmp_path / "many").glob("*.safetensors"))
    assert len(shards) > 2
    index = json.loads((tmp_path / "many" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    one = SkyReelsV3Transformer3DModel.from_pretrained(tmp_path / "one")
    many = SkyReelsV3Transformer3DModel.from_pretrained(tmp_path / "many")
    assert all(p.dtype == torch.float32 for p in many.parameters())
    for (k, a), (_, b) in zip(one.state_dict().items(), many.state_dict().items()):
        assert torch.equal(a, b), k


def test_pth_input_loaded_with_weights_only(tmp_path):
    case = GoldenCase("extension_fp32")
    folder = tmp_path / "o"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(case.meta["model_config"]))
    torch.save(load_file(str(case.dir / "weights.safetensors")), folder / "model.pth")
    convert_transformer(folder, tmp_path / "c", "extension")
    (tmp_path / "o" / "model.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception):
        convert_transformer(folder, tmp_path / "c2", "extension")


def test_config_reads_fields_the_original_ignores():
    """`text_dim`, `patch_size`, `cross_attn_norm` come from config.json (the original's from_config forces defaults)."""
    config = convert_config(
        {
            "model_type": "t2v",
            "dim": 64,
            "num_heads": 2,
            "text_dim": 32,
            "patch_size": [1, 2, 2],
            "in_dim": 16,
            "out_dim": 16,
            "ffn_dim": 128,
            "num_layers": 2,
            "cross_attn_norm": False,
            "qk_norm": True,
            "window_size": [-1, -1],
            "eps": 1e-6,
            "freq_dim": 256,
            "text_len": 8,
        },
        "extension",
    )
    assert config["text_dim"] == 32 and config["attention_head_dim"] == 32 and config["cross_attn_norm"] is False
    with pytest.raises(ValueError, match="window_size"):
        convert_config({"model_type": "t2v", "window_size": [4, 4]}, "extension")
    with pytest.raises(ValueError, match="Unknown field"):
        convert_config({"model_type": "t2v", "mystery": 1}, "extension")
    with pytest.raises(ValueError, match="model_type"):
        convert_config({"model_type": "t2v"}, "avatar")


def test_avatar_config_audio_fields():
    case = GoldenCase("avatar_fp32")
    config = convert_config(case.meta["model_config"], "avatar")
    assert config["in_channels"] == 36 and config["image_dim"] == 1280 and config["added_kv_proj_dim"] == 64
    assert (config["audio_intermediate_dim"], config["audio_dim"], config["audio_context_tokens"]) == (4, 16, 4)
    assert config["audio_norm_input"] is True and config["audio_vae_scale"] == 4


@pytest.mark.slow
def test_script_converts_and_reports_errors(tmp_path):
    case = GoldenCase("r2v_fp32")
    original = case.write_original_folder(tmp_path / "o")
    script = ROOT / "scripts" / "convert_checkpoints.py"
    ok = subprocess.run(
        [
            sys.executable,
            str(script),
            "transformer",
            "--variant",
            "reference",
            str(original),
            str(tmp_path / "c"),
            "--dtype",
            "bf16",
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    saved = load_file(str(tmp_path / "c" / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    SkyReelsV3Transformer3DModel.from_pretrained(tmp_path / "c")  # strict load succeeds
    bad = subprocess.run(
        [sys.executable, str(script), "transformer", "--variant", "extension", str(original), str(tmp_path / "d")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "error:" in bad.stderr
