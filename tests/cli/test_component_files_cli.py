"""`skyreels-v3 generate` from single component files: a ComfyUI `models` folder (+ `--transformer NAME`) or the
component flags alone; what is missing is listed with its flag before any weight loads; an FP8 transformer file is
not quantised again."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from skyreels_diffusers.app.cli import main
from skyreels_diffusers.app.request import GenerationRequest, validate
from skyreels_diffusers.app.run import load_pipeline
from skyreels_diffusers.app.tiny import tiny_text_encoder, tiny_tokenizer
from skyreels_diffusers.models import SkyReelsV3Transformer3DModel
from tests.conversion.comfyui_files import scaled_fp8_state
from tests.conversion.community_files import wan_native_state
from tests.conversion.original_repos import _vae_key_to_original, wan_layout_vae
from tests.helpers import random_image


TASK = "reference_to_video"
TRANSFORMER = "Wan21-SkyReelsV3-R2V_fp8_scaled.safetensors"
# real head width (128), so that every configuration is read off the tensors as for the real files
NARROW = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=256,
    ffn_dim=512,
    num_layers=1,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
)


def _save(path, state):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_files")
    models = root / "models"
    torch.manual_seed(0)
    transformer = SkyReelsV3Transformer3DModel(**NARROW).eval()
    _save(models / "diffusion_models" / TRANSFORMER, scaled_fp8_state(wan_native_state(transformer), "kijai")[0])
    text = {k: v.bfloat16() for k, v in tiny_text_encoder(1).state_dict().items() if "embed_tokens" not in k}
    _save(models / "text_encoders" / "umt5_xxl_bf16.safetensors", text)
    vae = {_vae_key_to_original(k): v for k, v in wan_layout_vae().state_dict().items()}
    _save(models / "vae" / "wan_2.1_vae.safetensors", vae)
    tiny_tokenizer().save_pretrained(root / "tokenizer")
    image = root / "ref.png"
    random_image(48, 64).save(image)
    return {"models": models, "tokenizer": str(root / "tokenizer"), "image": str(image), "root": root}


def _request(files, **kwargs) -> GenerationRequest:
    base = dict(
        task=TASK,
        model=str(files["models"]),
        transformer=TRANSFORMER,
        tokenizer=files["tokenizer"],
        ref_imgs=[files["image"]],
        duration=1,
        steps=1,
        height=32,
        width=48,
        device="cpu",
    )
    return GenerationRequest(**{**base, **kwargs})


def test_comfyui_models_folder_loads_the_pipeline_with_the_fp8_transformer_kept(files):
    pipe = load_pipeline(validate(_request(files)))
    assert type(pipe.transformer.blocks[0].ffn.net[0].proj.weight).__name__ == "Float8Tensor"
    assert pipe.transformer.config.num_attention_heads == 2  # read off the tensors
    assert pipe.vae.dtype == torch.float32 and pipe.text_encoder.dtype == torch.bfloat16


def test_missing_components_are_listed_with_their_flags_before_loading(files, tmp_path, capsys):
    (tmp_path / "models" / "vae").mkdir(parents=True)
    code = main(["generate", "--task", TASK, "--model", str(tmp_path / "models"), "--ref-imgs", files["image"]])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: --model: reference_to_video needs component files: ")
    assert "--transformer FILE (name the transformer file" in err and "--vae FILE (no file of its layout" in err
    assert "--text-encoder FILE (no file of its layout" in err and "models/text_encoders/ or" in err


def test_files_only_without_model_and_a_missing_one_named(files, capsys):
    models = files["models"]
    code = main(
        [
            "generate",
            "--task",
            TASK,
            "--ref-imgs",
            files["image"],
            "--transformer",
            str(models / "diffusion_models" / TRANSFORMER),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--text-encoder FILE (no file given)" in err and "--vae FILE (no file given)" in err


def test_fp8_transformer_file_is_not_quantised_again(files):
    with pytest.raises(ValueError, match="--quantize: .*already FP8"):
        validate(_request(files, quantize="fp8_weight_only"))
    with pytest.raises(ValueError, match="--quantize: .*already FP8"):
        validate(_request(files, fast=True))


def test_component_flag_needs_a_real_model(files):
    with pytest.raises(ValueError, match="--vae: needs --model"):
        validate(
            GenerationRequest(task=TASK, model="tiny", vae=str(files["models"] / "vae" / "wan_2.1_vae.safetensors"))
        )


@pytest.mark.slow
def test_generate_from_component_files_only(files, tmp_path):
    models = files["models"]
    out = tmp_path / "out.mp4"
    argv = [
        "generate", "--task", TASK, "--ref-imgs", files["image"], "--tokenizer", files["tokenizer"],
        "--transformer", str(models / "diffusion_models" / TRANSFORMER),
        "--text-encoder", str(models / "text_encoders" / "umt5_xxl_bf16.safetensors"),
        "--vae", str(models / "vae" / "wan_2.1_vae.safetensors"),
        "--duration", "1", "--steps", "1", "--height", "32", "--width", "48", "--device", "cpu", "--output", str(out),
    ]  # fmt: skip
    assert main(argv) == 0 and out.is_file() and out.stat().st_size > 0


def test_fp8_transformer_file_is_not_sharded(files, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    path = str(files["models"] / "diffusion_models" / TRANSFORMER)
    with pytest.raises(ValueError, match="--shard-weights: cannot shard an FP8 transformer file"):
        validate(_request(files, transformer=path, shard_weights=True))
