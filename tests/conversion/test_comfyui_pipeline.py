"""A whole pipeline from a ComfyUI `models` folder and / or explicit files (`Pipeline.from_comfyui`): the files found
by their layout, the same components as the usual loaders give, one error listing everything missing."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, Wav2Vec2Config

from skyreels_diffusers import SkyReelsV3ReferencePipeline, SkyReelsV3TalkingAvatarPipeline
from skyreels_diffusers.app.tasks import TASKS
from skyreels_diffusers.app.tiny import (
    TINY_CLIP_CONFIG,
    TINY_VAE_CONFIG,
    TINY_WAV2VEC2_CONFIG,
    tiny_components,
    tiny_tokenizer,
)
from skyreels_diffusers.loaders.comfyui import MissingComponentsError
from skyreels_diffusers.loaders.scaled_fp8 import quantize_to_fp8
from skyreels_diffusers.models.configs import TINY_TRANSFORMER_CONFIGS
from tests.conversion.comfyui_files import kijai_wav2vec2_state, scaled_fp8_state
from tests.conversion.community_files import wan_native_state
from tests.helpers import random_image


TRANSFORMER = "Wan21-SkyReelsV3-A2V_fp8_scaled_mixed.safetensors"
CONFIGS = {
    "transformer": TINY_TRANSFORMER_CONFIGS["avatar"],
    "vae": TINY_VAE_CONFIG,
    "image_encoder": CLIPVisionConfig(**TINY_CLIP_CONFIG),
    "audio_encoder": Wav2Vec2Config(**TINY_WAV2VEC2_CONFIG),
}


def _save(path, state):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def _fp8_text_encoder(model) -> tuple[dict, dict]:
    out, reference = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, {}
    for key, value in model.state_dict().items():
        if key.startswith("encoder.block.") and value.ndim == 2 and "relative" not in key:
            q, scale = quantize_to_fp8(value)
            out[key], out[key.removesuffix(".weight") + ".scale_weight"] = q, scale
            reference[key] = q.float() * scale
        elif key != "encoder.embed_tokens.weight":
            out[key] = reference[key] = value
    reference["encoder.embed_tokens.weight"] = reference["shared.weight"]
    return out, reference


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory):
    """A ComfyUI `models` folder holding the tiny avatar components in the community layouts (+ files of other
    models beside them), a tokenizer folder, and the weights each file decodes to."""
    root = tmp_path_factory.mktemp("comfyui")
    models, parts = root / "models", tiny_components("talking_avatar")
    transformer_file, _, transformer_ref = scaled_fp8_state(wan_native_state(parts["transformer"]), "kijai")
    _save(models / "diffusion_models" / "WanVideo" / TRANSFORMER, transformer_file)
    _save(
        models / "diffusion_models" / "flux1-dev.safetensors", {"double_blocks.0.img_attn.proj.weight": torch.ones(2)}
    )
    text_file, text_ref = _fp8_text_encoder(parts["text_encoder"])
    _save(models / "text_encoders" / "umt5_xxl_fp8_e4m3fn_scaled.safetensors", text_file)
    _save(
        models / "text_encoders" / "clip_l.safetensors", {"text_model.encoder.layers.0.mlp.fc1.weight": torch.ones(2)}
    )
    _save(models / "vae" / "wan_2.1_vae.safetensors", parts["vae"].state_dict())
    clip = {f"vision_model.{k}": v for k, v in parts["image_encoder"].state_dict().items()}
    _save(
        models / "clip_vision" / "clip_vision_h.safetensors", {**clip, "visual_projection.weight": torch.ones(32, 32)}
    )
    _save(
        models / "wav2vec2" / "wav2vec2-chinese-base_fp16.safetensors",
        kijai_wav2vec2_state(parts["audio_encoder"].state_dict(), torch.float32),
    )
    tiny_tokenizer().save_pretrained(root / "tokenizer")
    return {
        "models": models,
        "tokenizer": root / "tokenizer",
        "parts": parts,
        "transformer": transformer_ref,
        "text": text_ref,
    }


def _from_comfyui(comfyui, **kwargs):
    return SkyReelsV3TalkingAvatarPipeline.from_comfyui(
        comfyui["models"],
        **{
            "transformer": TRANSFORMER,
            "scheduler": TASKS["talking_avatar"].make_scheduler(),
            "tokenizer": comfyui["tokenizer"],
            "configs": CONFIGS,
            "torch_dtype": torch.float32,
            **kwargs,
        },
    )


def _same(got: torch.nn.Module, expected: dict):
    state = got.state_dict()
    for key, value in expected.items():
        assert torch.equal(state[key].float(), value.float()), key


def test_models_folder_gives_every_component_as_the_usual_loaders_do(comfyui):
    pipe = _from_comfyui(comfyui, keep_fp8=False)
    parts = comfyui["parts"]
    expected_transformer = type(parts["transformer"]).from_single_file(
        comfyui["transformer"], config=CONFIGS["transformer"], torch_dtype=torch.float32
    )
    _same(pipe.transformer, expected_transformer.state_dict())
    _same(pipe.text_encoder, comfyui["text"])
    _same(pipe.vae, parts["vae"].state_dict())
    _same(pipe.image_encoder, parts["image_encoder"].state_dict())
    _same(pipe.audio_encoder, parts["audio_encoder"].state_dict())
    assert pipe.feature_extractor.to_dict() == parts["feature_extractor"].to_dict()
    assert pipe.tokenizer("a woman talks").input_ids == parts["tokenizer"]("a woman talks").input_ids
    assert pipe.vae.dtype == torch.float32 and pipe.audio_encoder.dtype == torch.float32


def test_fp8_files_stay_fp8_in_the_pipeline(comfyui):
    pipe = _from_comfyui(comfyui)
    assert type(pipe.transformer.blocks[0].attn1.to_q.weight).__name__ == "Float8Tensor"
    assert type(pipe.text_encoder.encoder.block[0].layer[0].SelfAttention.q.weight).__name__ == "Float8Tensor"
    dequantised = _from_comfyui(comfyui, keep_fp8=False)
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt("a woman talks", device=torch.device("cpu"), dtype=torch.float32)
        expected, _ = dequantised.encode_prompt("a woman talks", device=torch.device("cpu"), dtype=torch.float32)
    assert float((embeds - expected).norm() / expected.norm()) < 1e-5


def test_pipeline_from_files_generates_what_the_same_weights_generate(comfyui):
    """End to end: the pipeline built from the ComfyUI files (dequantised) and the tiny pipeline holding the very
    weights those files decode to give the same video."""
    pipe = _from_comfyui(comfyui, keep_fp8=False)
    parts = dict(comfyui["parts"])
    parts["transformer"] = type(parts["transformer"]).from_single_file(
        comfyui["transformer"], config=CONFIGS["transformer"], torch_dtype=torch.float32
    )  # the weights the file decodes to, loaded the usual way
    parts["text_encoder"].load_state_dict(comfyui["text"])
    reference = SkyReelsV3TalkingAvatarPipeline(**parts)
    args = dict(
        image=random_image(60, 40), prompt="a woman talks", height=32, width=48, audio=_speech(), output_type="np"
    )
    for p in (pipe, reference):
        p.set_progress_bar_config(disable=True)
    got = pipe(**args, generator=torch.Generator().manual_seed(0)).frames
    expected = reference(**args, generator=torch.Generator().manual_seed(0)).frames
    assert got.shape == expected.shape and abs(got - expected).max() < 1e-5


def _speech():
    import numpy as np

    from skyreels_diffusers.pipelines.audio_io import load_speech

    t = np.arange(16000) / 16000
    wave = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    return load_speech(wave, sample_rate=16000)


def test_explicit_files_without_a_models_folder(comfyui):
    models = comfyui["models"]
    pipe = SkyReelsV3TalkingAvatarPipeline.from_comfyui(
        transformer=models / "diffusion_models" / "WanVideo" / TRANSFORMER,
        text_encoder=models / "text_encoders" / "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
        vae=models / "vae" / "wan_2.1_vae.safetensors",
        image_encoder=models / "clip_vision" / "clip_vision_h.safetensors",
        audio_encoder=models / "wav2vec2" / "wav2vec2-chinese-base_fp16.safetensors",
        scheduler=TASKS["talking_avatar"].make_scheduler(),
        tokenizer=comfyui["tokenizer"],
        configs=CONFIGS,
    )
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.float32  # the default dtypes


def test_everything_missing_is_listed_at_once(comfyui, tmp_path):
    (tmp_path / "models" / "vae").mkdir(parents=True)
    with pytest.raises(MissingComponentsError) as info:
        SkyReelsV3TalkingAvatarPipeline.from_comfyui(tmp_path / "models", tokenizer=comfyui["tokenizer"])
    assert set(info.value.missing) == {
        "transformer",
        "text_encoder",
        "vae",
        "image_encoder",
        "audio_encoder",
        "scheduler",
    }
    message = str(info.value)
    assert "SkyReelsV3TalkingAvatarPipeline needs" in message and "name the transformer file" in message
    assert "no file of its layout" in message


def test_transformer_is_never_guessed_and_names_the_candidates(comfyui):
    with pytest.raises(MissingComponentsError, match=f"name the transformer file.*{TRANSFORMER}"):
        _from_comfyui(comfyui, transformer=None)


def test_two_candidate_files_are_an_error_naming_both(comfyui, tmp_path):
    import shutil

    models = tmp_path / "models"
    shutil.copytree(comfyui["models"], models)
    shutil.copy(models / "vae" / "wan_2.1_vae.safetensors", models / "vae" / "Wan2_1_VAE_bf16.safetensors")
    with pytest.raises(MissingComponentsError, match=r"vae: several candidates.*Wan2_1_VAE_bf16.*wan_2\.1_vae"):
        SkyReelsV3TalkingAvatarPipeline.from_comfyui(
            models,
            transformer=TRANSFORMER,
            scheduler=TASKS["talking_avatar"].make_scheduler(),
            tokenizer=comfyui["tokenizer"],
        )


def test_a_transformer_of_the_wrong_kind_is_refused(comfyui, tmp_path):
    parts = tiny_components("reference_to_video")
    path = tmp_path / "r2v.safetensors"
    _save(path, wan_native_state(parts["transformer"]))
    with pytest.raises(ValueError, match=r"r2v\.safetensors: holds a video \(no audio\) transformer"):
        _from_comfyui(
            comfyui, transformer=path, configs={**CONFIGS, "transformer": TINY_TRANSFORMER_CONFIGS["reference"]}
        )
    with pytest.raises(TypeError, match="no component"):
        SkyReelsV3ReferencePipeline.from_comfyui(comfyui["models"], audio_encoder="x.safetensors")
