"""Whole-repo conversion on tiny repos in the original layouts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from skyreels_diffusers import (
    SkyReelsV3ExtensionPipeline,
    SkyReelsV3ReferencePipeline,
    SkyReelsV3ShotSwitchingPipeline,
    SkyReelsV3Transformer3DModel,
)
from skyreels_diffusers.app.convert import convert_repo, convert_transformer
from skyreels_diffusers.app.tasks import TASKS
from tests.conversion.original_repos import build_extension_repo, build_reference_repo, remove
from tests.helpers import random_image, random_video


ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(height=32, width=48, num_inference_steps=2)


def test_reference_repo_converts_and_matches_unconverted_components(tmp_path):
    parts = build_reference_repo(tmp_path / "orig")
    [folder] = convert_repo("reference_to_video", tmp_path / "orig", tmp_path / "conv", dtype=torch.float32)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "SkyReelsV3ReferencePipeline"
    assert index["transformer"] == [
        "skyreels_diffusers.models.transformer_skyreels_v3",
        "SkyReelsV3Transformer3DModel",
    ]
    assert (folder / "README.md").is_file()

    loaded = SkyReelsV3ReferencePipeline.from_pretrained(folder)
    assert loaded.scheduler.config.flow_shift == 5.0 and loaded.scheduler.config.use_flow_sigmas
    reference = SkyReelsV3ReferencePipeline(**parts, scheduler=TASKS["reference_to_video"].make_scheduler())
    kwargs = dict(ref_images=[random_image()], prompt="a cat", num_frames=5, **SMALL)
    out = loaded(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    ref = reference(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    np.testing.assert_allclose(out, ref, atol=1e-6)


@pytest.mark.slow
def test_diffusion_pipeline_from_pretrained_resolves_our_class(tmp_path):
    build_reference_repo(tmp_path / "orig")
    convert_repo("reference_to_video", tmp_path / "orig", tmp_path / "conv")
    code = (
        "import skyreels_diffusers, torch\n"
        "from diffusers import DiffusionPipeline\n"
        f"p = DiffusionPipeline.from_pretrained({str(tmp_path / 'conv')!r})\n"
        "print(type(p).__name__, type(p.transformer).__name__, p.transformer.dtype)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["SkyReelsV3ReferencePipeline", "SkyReelsV3Transformer3DModel", "torch.float32"]


@pytest.mark.slow
def test_extension_repo_yields_two_pipelines(tmp_path):
    parts = build_extension_repo(tmp_path / "orig")
    single, shot = convert_repo("video_extension", tmp_path / "orig", tmp_path / "conv", dtype=torch.float32)
    assert (single.name, shot.name) == ("single_shot_extension", "shot_switching_extension")
    assert json.loads((shot / "model_index.json").read_text())["_class_name"] == "SkyReelsV3ShotSwitchingPipeline"

    # the VAE and T5 round-trip exactly through the original key names
    single_pipe = SkyReelsV3ExtensionPipeline.from_pretrained(single)
    for name in ("vae", "text_encoder"):
        ours, theirs = getattr(single_pipe, name).state_dict(), parts[name].state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k].float(), theirs[k].float()) for k in ours), name
    assert single_pipe.scheduler.config.flow_shift == 8.0

    # output equals the unconverted components' (transformer straight from the original folder)
    convert_transformer(tmp_path / "orig" / "shot_transformer", tmp_path / "t", "extension")
    reference = SkyReelsV3ShotSwitchingPipeline(
        **parts,
        transformer=SkyReelsV3Transformer3DModel.from_pretrained(tmp_path / "t"),
        scheduler=TASKS["single_shot_extension"].make_scheduler(),
    )
    shot_pipe = SkyReelsV3ShotSwitchingPipeline.from_pretrained(shot)
    kwargs = dict(video=random_video(frames=12), prompt="[ZOOM_IN_CUT] a face", duration=2, **SMALL)
    out = shot_pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    ref = reference(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("missing", ["Wan2.1_VAE.pth", "shot_transformer", "google"])
def test_extension_repo_missing_part_fails_and_writes_nothing(tmp_path, missing):
    build_extension_repo(tmp_path / "orig")
    remove(tmp_path / "orig" / missing)
    with pytest.raises(FileNotFoundError):
        convert_repo("video_extension", tmp_path / "orig", tmp_path / "conv")
    assert not (tmp_path / "conv").exists()
    assert not list(tmp_path.glob(".conv*"))


def test_t5_with_an_unknown_key_is_rejected(tmp_path):
    build_extension_repo(tmp_path / "orig")
    pth = tmp_path / "orig" / "models_t5_umt5-xxl-enc-bf16.pth"
    state = torch.load(pth, weights_only=True)
    state["blocks.0.attn.extra.weight"] = torch.zeros(1)
    torch.save(state, pth)
    with pytest.raises(KeyError, match="blocks.0.attn.extra.weight"):
        convert_repo("video_extension", tmp_path / "orig", tmp_path / "conv")


def test_script_repo_command_and_push_to_hub(tmp_path, monkeypatch):
    build_reference_repo(tmp_path / "orig")
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, exist_ok):
            calls.append(("create", repo_id))

        def upload_folder(self, repo_id, folder_path, path_in_repo, commit_message):
            calls.append(("upload", repo_id, Path(folder_path).name, path_in_repo))

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import convert_checkpoints
    finally:
        sys.path.pop(0)
    code = convert_checkpoints.main(
        [
            "repo",
            "--task",
            "reference_to_video",
            str(tmp_path / "orig"),
            str(tmp_path / "conv"),
            "--push-to-hub",
            "me/skyreels-r2v",
        ]
    )
    assert code == 0
    assert calls == [("create", "me/skyreels-r2v"), ("upload", "me/skyreels-r2v", "conv", None)]
    config = json.loads((tmp_path / "conv" / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "SkyReelsV3Transformer3DModel"


def test_avatar_repo_converts_every_component(tmp_path):
    from skyreels_diffusers import SkyReelsV3FlowEulerScheduler, SkyReelsV3TalkingAvatarPipeline
    from tests.conversion.original_repos import build_avatar_repo, open_clip_penultimate

    parts = build_avatar_repo(tmp_path / "orig")
    [folder] = convert_repo("talking_avatar", tmp_path / "orig", tmp_path / "conv", dtype=torch.float32)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "SkyReelsV3TalkingAvatarPipeline"
    assert index["image_encoder"] == ["transformers", "CLIPVisionModel"]
    assert index["audio_encoder"] == ["transformers", "Wav2Vec2Model"]
    assert index["scheduler"][1] == "SkyReelsV3FlowEulerScheduler"

    pipe = SkyReelsV3TalkingAvatarPipeline.from_pretrained(folder)
    assert isinstance(pipe.scheduler, SkyReelsV3FlowEulerScheduler) and pipe.scheduler.config.shift == 11.0
    assert pipe.transformer.config.audio_in_dim == 768 and pipe.transformer.config.in_channels == 36
    ours, theirs = pipe.audio_encoder.state_dict(), parts["audio_encoder"].state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)

    # CLIP: the converted tower's penultimate layer equals the original structure's forward
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = pipe.image_encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        reference = open_clip_penultimate(parts["clip_state"], pixels)
    assert ours.shape == (1, 257, 160)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


def test_avatar_repo_with_incomplete_wav2vec2_fails(tmp_path):
    from tests.conversion.original_repos import build_avatar_repo

    build_avatar_repo(tmp_path / "orig")
    remove(tmp_path / "orig" / "chinese-wav2vec2-base" / "model.safetensors")
    with pytest.raises((FileNotFoundError, OSError, KeyError)):
        convert_repo("talking_avatar", tmp_path / "orig", tmp_path / "conv")
    assert not (tmp_path / "conv").exists()


def test_converted_clip_is_usable_without_a_save_round_trip(tmp_path):
    """`convert_clip` builds on the meta device: every buffer (the non-persistent position ids too) must hold real
    values, so the returned model gives the open-clip penultimate features directly, the same on every call."""
    from skyreels_diffusers.loaders.components import convert_clip
    from tests.conversion.original_repos import open_clip_penultimate, open_clip_visual_state

    state = open_clip_visual_state()
    torch.save(state, tmp_path / "clip.pth")
    model = convert_clip(tmp_path / "clip.pth", torch.float32)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        second = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    reference = open_clip_penultimate(state, pixels)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, reference, rtol=1e-4, atol=1e-4)
