"""The pipelines' other components from ComfyUI's / kijai's / the original's single files, one call each: the same
weights as the usual loaders give, in every layout and dtype, strictly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from skyreels_diffusers.app.tiny import TINY_WAV2VEC2_CONFIG, tiny_text_encoder
from skyreels_diffusers.loaders.component_files import (
    load_audio_encoder_file,
    load_image_encoder_file,
    load_text_encoder_file,
    load_vae_file,
    wav2vec2_config,
)
from skyreels_diffusers.loaders.components import convert_clip, convert_t5, convert_wan_vae, load_wav2vec2
from skyreels_diffusers.loaders.scaled_fp8 import quantize_to_fp8
from tests.conversion.comfyui_files import hf_clip_state, kijai_wav2vec2_state, open_clip_resblocks_state
from tests.conversion.original_repos import (
    _T5_TO_ORIGINAL,
    _rename,
    _vae_key_to_original,
    open_clip_penultimate,
    open_clip_visual_state,
    wan_layout_vae,
)
from tests.helpers import FIXTURES


WAV2VEC2 = FIXTURES / "pipelines" / "talking_avatar" / "wav2vec2"


def _save(path, state, **metadata):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata or None)
    return path


def _assert_same_weights(got: torch.nn.Module, expected: dict[str, torch.Tensor]):
    state = got.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key


# ---------------------------------------------------------------------------------------------- text encoder
@pytest.fixture(scope="module")
def t5():
    model = tiny_text_encoder(seed=3)
    tokens = torch.randint(0, 260, (1, 9), generator=torch.Generator().manual_seed(0))
    return model, tokens


def _encode(model, tokens):
    with torch.no_grad():
        return model(tokens, torch.ones_like(tokens)).last_hidden_state.float()


def test_comfyui_bf16_umt5_file_equals_the_model(t5, tmp_path):
    """ComfyUI's `umt5_xxl_fp16`-style file: transformers names, the tied embedding saved once, a `spiece_model`
    tensor (the tokenizer's bytes) beside the weights."""
    model, tokens = t5
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    state["spiece_model"] = torch.arange(16, dtype=torch.uint8)
    loaded = load_text_encoder_file(_save(tmp_path / "umt5_xxl_bf16.safetensors", state), torch.float32)
    expected = {k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()}
    _assert_same_weights(loaded, expected)
    assert loaded.shared.weight.data_ptr() == loaded.encoder.embed_tokens.weight.data_ptr()


def test_wan_native_t5_file_equals_the_original_converter(t5, tmp_path):
    """kijai's `umt5-xxl-enc-bf16.safetensors` / the original `.pth`: Wan-native names."""
    model, tokens = t5
    wan = _rename(model.state_dict(), _T5_TO_ORIGINAL)
    torch.save(wan, tmp_path / "t5.pth")
    expected = convert_t5(tmp_path / "t5.pth", torch.float32)
    for path in (_save(tmp_path / "umt5-xxl-enc.safetensors", wan), tmp_path / "t5.pth"):
        loaded = load_text_encoder_file(path, torch.float32)
        _assert_same_weights(loaded, expected.state_dict())
        assert torch.equal(_encode(loaded, tokens), _encode(model, tokens))


def _fp8_t5_file(model, tmp_path, name="umt5_xxl_fp8_e4m3fn_scaled.safetensors"):
    """ComfyUI's FP8-scaled UMT5: the block linears FP8 with `scale_weight`, the rest bf16, a `scaled_fp8` marker."""
    out, reference = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, {}
    for key, value in model.state_dict().items():
        if key == "encoder.embed_tokens.weight":
            continue
        if key.startswith("encoder.block.") and value.ndim == 2 and "relative_attention_bias" not in key:
            q, scale = quantize_to_fp8(value)
            out[key], out[key.removesuffix(".weight") + ".scale_weight"] = q, scale
            reference[key] = q.float() * scale
        else:
            out[key] = value.to(torch.bfloat16)
            reference[key] = out[key].float()
    reference["encoder.embed_tokens.weight"] = reference["shared.weight"]
    return _save(tmp_path / name, out), reference


def test_fp8_scaled_umt5_dequantised_and_kept_fp8(t5, tmp_path):
    model, tokens = t5
    path, reference = _fp8_t5_file(model, tmp_path)
    dequantised = load_text_encoder_file(path, torch.float32, keep_fp8=False)
    _assert_same_weights(dequantised, reference)
    kept = load_text_encoder_file(path, torch.float32)
    wi = kept.encoder.block[0].layer[1].DenseReluDense.wi_0.weight
    assert type(wi).__name__ == "Float8Tensor" and wi.qdata.dtype == torch.float8_e4m3fn
    assert type(kept.shared.weight).__name__ == "Parameter"  # the embedding is not a linear: plain
    out, expected = _encode(kept, tokens), _encode(dequantised, tokens)
    assert float((out - expected).norm() / expected.norm()) < 1e-5


def test_bad_text_encoder_files_name_the_tensor(t5, tmp_path):
    model, _ = t5
    state = {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    del state["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    with pytest.raises(KeyError, match=r"t5\.safetensors.*encoder\.block\.1\.layer\.1\.DenseReluDense\.wo\.weight"):
        load_text_encoder_file(_save(tmp_path / "t5.safetensors", state))
    path, _ = _fp8_t5_file(model, tmp_path, "fp8.safetensors")
    from safetensors.torch import load_file

    broken = load_file(str(path))
    del broken["encoder.block.0.layer.0.SelfAttention.k.scale_weight"]
    with pytest.raises(ValueError, match=r"encoder\.block\.0\.layer\.0\.SelfAttention\.k\.weight has no scale"):
        load_text_encoder_file(_save(tmp_path / "broken.safetensors", broken))


# ---------------------------------------------------------------------------------------------- image encoder
def _penultimate(model, pixels):
    with torch.no_grad():
        return model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]


@pytest.mark.parametrize("layout", ["comfyui_hf_fp16", "open_clip", "wan_native"])
def test_clip_vision_files_equal_the_original_converter(layout, tmp_path):
    wan = open_clip_visual_state()
    torch.save(wan, tmp_path / "clip.pth")
    expected = convert_clip(tmp_path / "clip.pth", torch.float32)
    state = {
        "comfyui_hf_fp16": lambda: {k: v.half() for k, v in hf_clip_state(wan).items()},
        "open_clip": lambda: open_clip_resblocks_state(wan),
        "wan_native": lambda: wan,
    }[layout]()
    loaded = load_image_encoder_file(_save(tmp_path / "clip_vision_h.safetensors", state), torch.float32)
    if layout == "comfyui_hf_fp16":
        expected = convert_clip(tmp_path / "clip.pth", torch.float16).float()
    _assert_same_weights(loaded, expected.state_dict())
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    if layout != "comfyui_hf_fp16":  # the original tower's own forward, written independently
        torch.testing.assert_close(_penultimate(loaded, pixels), open_clip_penultimate(wan, pixels), atol=2e-5, rtol=0)


def test_clip_vision_file_with_an_unknown_tensor_is_refused(tmp_path):
    state = hf_clip_state(open_clip_visual_state())
    state["vision_model.encoder.layers.0.extra.weight"] = torch.zeros(2)
    with pytest.raises(KeyError, match=r"clip\.safetensors.*encoder\.layers\.0\.extra\.weight"):
        load_image_encoder_file(_save(tmp_path / "clip.safetensors", state))


# ---------------------------------------------------------------------------------------------- VAE
def test_wan_vae_files_equal_the_original_converter(tmp_path):
    """ComfyUI's `wan_2.1_vae.safetensors` (Wan-native names), kijai's bf16 one, and diffusers names."""
    vae = wan_layout_vae()
    original = {_vae_key_to_original(k): v for k, v in vae.state_dict().items()}
    torch.save(original, tmp_path / "Wan2.1_VAE.pth")
    expected = convert_wan_vae(tmp_path / "Wan2.1_VAE.pth").state_dict()
    _assert_same_weights(load_vae_file(_save(tmp_path / "wan_2.1_vae.safetensors", original)), expected)
    _assert_same_weights(load_vae_file(_save(tmp_path / "diffusers.safetensors", vae.state_dict())), expected)
    bf16 = load_vae_file(
        _save(tmp_path / "Wan2_1_VAE_bf16.safetensors", {k: v.bfloat16() for k, v in original.items()})
    )
    _assert_same_weights(bf16, {k: v.bfloat16().float() for k, v in expected.items()})
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes((tmp_path / "wan_2.1_vae.safetensors").read_bytes()[:-64])
    with pytest.raises(ValueError, match=r"cut\.safetensors is truncated: tensor"):
        load_vae_file(truncated)


# ---------------------------------------------------------------------------------------------- wav2vec2
def test_kijai_wav2vec2_file_equals_the_folder(tmp_path):
    folder_model, folder_extractor = load_wav2vec2(WAV2VEC2)
    expected = {k: v.half().float() for k, v in folder_model.state_dict().items()}
    path = _save(tmp_path / "wav2vec2-chinese-base_fp16.safetensors", kijai_wav2vec2_state(folder_model.state_dict()))
    model, extractor = load_audio_encoder_file(path, config=WAV2VEC2)
    _assert_same_weights(model, expected)
    assert extractor.to_dict() == folder_extractor.to_dict()
    speech = torch.randn(1, 16000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(speech, output_hidden_states=True).hidden_states[-1]
        reference = folder_model(speech, output_hidden_states=True).hidden_states[-1]
    assert float((got - reference).norm() / reference.norm()) < 5e-3  # fp16-rounded weights


def test_wav2vec2_architecture_is_read_off_the_tensors(tmp_path):
    folder_model, _ = load_wav2vec2(WAV2VEC2)
    path = _save(tmp_path / "w.safetensors", kijai_wav2vec2_state(folder_model.state_dict(), torch.float32))
    model, extractor = load_audio_encoder_file(path)
    inferred = model.config
    for field in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "conv_dim",
        "conv_kernel",
        "conv_stride",
        "conv_bias",
        "feat_extract_norm",
        "num_conv_pos_embeddings",
        "num_conv_pos_embedding_groups",
    ):
        assert getattr(inferred, field) == TINY_WAV2VEC2_CONFIG[field] or list(getattr(inferred, field)) == list(
            TINY_WAV2VEC2_CONFIG[field]
        ), field
    assert extractor.do_normalize and extractor.sampling_rate == 16000  # the original folder's feature extractor
    assert wav2vec2_config(model.state_dict()).hidden_size == TINY_WAV2VEC2_CONFIG["hidden_size"]
