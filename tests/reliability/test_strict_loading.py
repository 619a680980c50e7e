"""Model folders load strictly: the right pipeline class (checked before any weight), every shard present and
whole, every weight of every component found; each failure names the component, the file and the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from skyreels_diffusers.app.tiny import tiny_pipeline
from skyreels_diffusers.loaders import pipeline_folder as loading
from skyreels_diffusers.loaders.pipeline_folder import load_pipeline_folder
from skyreels_diffusers.pipelines import SkyReelsV3ReferencePipeline, SkyReelsV3TalkingAvatarPipeline


AVATAR = SkyReelsV3TalkingAvatarPipeline


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny avatar folder (text encoder, CLIP, wav2vec2, VAE, transformer) and the pipeline it came from."""
    pipe = tiny_pipeline("talking_avatar")
    folder = tmp_path_factory.mktemp("folders") / "avatar"
    pipe.save_pretrained(folder)
    return folder, pipe


@pytest.fixture
def folder(saved, tmp_path):
    return shutil.copytree(saved[0], tmp_path / "avatar")


def _weights(folder, component):
    return next(p for p in (folder / component).iterdir() if p.suffix == ".safetensors")


def _drop_key(folder, component, key_part):
    path = _weights(folder, component)
    state = load_file(path)
    key = next(k for k in sorted(state) if key_part in k)
    del state[key]
    save_file(state, path, metadata={"format": "pt"})
    return key


def test_a_whole_folder_loads_with_its_weights(saved):
    folder, original = saved
    pipe = load_pipeline_folder(folder, AVATAR, {"default": torch.float32})
    assert type(pipe) is AVATAR
    for name in ("text_encoder", "image_encoder", "audio_encoder", "vae", "transformer"):
        mine, theirs = getattr(pipe, name).state_dict(), getattr(original, name).state_dict()
        assert mine.keys() == theirs.keys(), name
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), name


def test_a_folder_for_another_task_is_refused_before_any_weight(saved, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a component was loaded")

    monkeypatch.setattr(loading, "load_component", no_loading)
    with pytest.raises(
        ValueError,
        match=r"model_index\.json\): holds a SkyReelsV3TalkingAvatarPipeline, but this "
        r"task needs a SkyReelsV3ReferencePipeline",
    ):
        load_pipeline_folder(saved[0], SkyReelsV3ReferencePipeline, torch.float32)


@pytest.mark.parametrize(
    "component, key_part",
    [
        ("text_encoder", "relative_attention_bias"),
        ("image_encoder", "post_layernorm"),
        ("audio_encoder", "feature_projection"),
        ("vae", "decoder.conv_out"),
        ("transformer", "proj_out"),
    ],
)
def test_a_missing_weight_names_the_component_and_the_key(folder, component, key_part):
    key = _drop_key(folder, component, key_part)
    with pytest.raises(ValueError) as error:
        load_pipeline_folder(folder, AVATAR, torch.float32)
    message = str(error.value)
    assert f"component `{component}` ({component}/" in message and "missing" in message, message
    assert key in message  # the transformer reports its own check ("missing keys: [...]"), the others ours


def test_an_unexpected_weight_is_refused(folder):
    path = _weights(folder, "image_encoder")
    state = load_file(path)
    state["vision_model.extra.weight"] = torch.zeros(2)
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"component `image_encoder` .*1 unexpected weights \(.*extra\.weight\)"):
        load_pipeline_folder(folder, AVATAR, torch.float32)


def test_a_truncated_safetensors_file_is_named(folder):
    path = _weights(folder, "vae")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ValueError,
        match=rf"component `vae` \(vae/{path.name}\): truncated: {len(data) // 2} bytes, "
        rf"{len(data)} expected",
    ):
        load_pipeline_folder(folder, AVATAR, torch.float32)
    path.write_bytes(b"\x01\x00")
    with pytest.raises(ValueError, match=r"component `vae` .*too short for a safetensors file"):
        load_pipeline_folder(folder, AVATAR, torch.float32)


def test_a_missing_shard_is_named(saved, folder):
    shutil.rmtree(folder / "transformer")
    saved[1].transformer.save_pretrained(folder / "transformer", max_shard_size="200KB")
    index = json.loads(next((folder / "transformer").glob("*.index.json")).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    (folder / "transformer" / shards[1]).unlink()
    with pytest.raises(
        ValueError, match=rf"component `transformer` \(.*index\.json\): missing shard\(s\): {shards[1]}"
    ):
        load_pipeline_folder(folder, AVATAR, torch.float32)


def test_missing_folder_parts(folder, tmp_path):
    shutil.rmtree(folder / "audio_encoder")
    with pytest.raises(ValueError, match=r"component `audio_encoder` \(audio_encoder/\): the subfolder is missing"):
        load_pipeline_folder(folder, AVATAR, torch.float32)
    (folder / "model_index.json").unlink()
    with pytest.raises(ValueError, match=r"the folder \(model_index\.json\): missing; not a diffusers pipeline"):
        load_pipeline_folder(folder, AVATAR, torch.float32)
    with pytest.raises(ValueError, match="not a folder"):
        load_pipeline_folder(tmp_path / "nowhere", AVATAR, torch.float32)


@pytest.mark.parametrize("task", ["reference_to_video", "talking_avatar"])
def test_converted_folders_pass_the_strict_checks(tmp_path, task):
    """Folders written by the converter (from stand-ins of the original repositories) load strictly, unchanged."""
    from skyreels_diffusers.app.convert import convert_repo
    from skyreels_diffusers.app.tasks import TASKS
    from tests.conversion import original_repos

    build = {
        "reference_to_video": original_repos.build_reference_repo,
        "talking_avatar": original_repos.build_avatar_repo,
    }[task]
    parts = build(tmp_path / "orig")
    [folder] = convert_repo(task, tmp_path / "orig", tmp_path / "conv", dtype=torch.float32)
    pipe = load_pipeline_folder(folder, TASKS[task].pipeline_class, torch.float32)
    ours, theirs = pipe.text_encoder.state_dict(), parts["text_encoder"].state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_per_component_dtypes(saved):
    pipe = load_pipeline_folder(
        saved[0], AVATAR, {"default": torch.bfloat16, "vae": torch.float32, "audio_encoder": torch.float32}
    )
    dtypes = {
        name: getattr(pipe, name).dtype
        for name in ("text_encoder", "image_encoder", "audio_encoder", "vae", "transformer")
    }
    assert dtypes == {
        "text_encoder": torch.bfloat16,
        "image_encoder": torch.bfloat16,
        "audio_encoder": torch.float32,
        "vae": torch.float32,
        "transformer": torch.bfloat16,
    }
