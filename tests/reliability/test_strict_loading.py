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
    (folder / "model_index.json").unlink()  # the converted layout is named (before: "not a diffusers pipeline")
    with pytest.raises(ValueError, match=r"\(model_index\.json\): missing, but the folder holds a saved pipeline's"):
        load_pipeline_folder(folder, AVATAR, torch.float32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"the folder \(model_index\.json\): missing; not a diffusers pipeline"):
        load_pipeline_folder(tmp_path / "empty", AVATAR, torch.float32)
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


# ------------------------------------------------------------------------- the Python path: from_pretrained


def _diffusion_pipeline(folder, **kwargs):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder, **kwargs)


LOADERS = {
    "Pipeline.from_pretrained": lambda folder, **kwargs: AVATAR.from_pretrained(folder, **kwargs),
    "DiffusionPipeline.from_pretrained": _diffusion_pipeline,
    "load_pipeline_folder": lambda folder, dtype: load_pipeline_folder(folder, AVATAR, dtype),
}


@pytest.mark.parametrize("loader", ["Pipeline.from_pretrained", "DiffusionPipeline.from_pretrained"])
def test_from_pretrained_loads_a_whole_folder_unchanged(saved, loader):
    folder, original = saved
    pipe = LOADERS[loader](folder, dtype=torch.float32)
    assert type(pipe) is AVATAR
    for name in ("text_encoder", "image_encoder", "audio_encoder", "vae", "transformer"):
        mine, theirs = getattr(pipe, name).state_dict(), getattr(original, name).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), name


def _damage_tensor(folder, component, how):
    path = _weights(folder, component)
    state = load_file(path)
    key = next(k for k in sorted(state) if {"vae": "decoder.conv_out.bias"}.get(component, "") in k)
    if how == "missing":
        del state[key]
    elif how == "unexpected":
        key = key.rsplit(".", 2)[0] + ".extra.weight"
        state[key] = torch.zeros(2)
    else:
        state[key] = torch.zeros(state[key].numel() + 2)
    save_file(state, path, metadata={"format": "pt"})
    return path, key


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize(
    "component, how",
    [("vae", "missing"), ("text_encoder", "missing"), ("image_encoder", "unexpected"), ("vae", "wrong shape")],
)
def test_from_pretrained_refuses_missing_unexpected_or_misshaped_tensors(folder, loader, component, how):
    """Before: `from_pretrained` loaded a VAE or text encoder lacking a weight with a warning and a random tensor,
    and an unexpected CLIP weight silently; the error names the component, the file and the tensor."""
    path, key = _damage_tensor(folder, component, how)
    with pytest.raises(ValueError) as error:
        LOADERS[loader](folder, dtype=torch.float32)
    message = str(error.value)
    assert key in message, message
    if not (loader.startswith("Diffusion") and how == "wrong shape"):  # there diffusers' own loader refuses first
        assert f"component `{component}` ({component}/{path.name}): 1 " in message, message
        assert {"missing": "missing", "unexpected": "unexpected"}.get(how, "wrong shape") in message, message


@pytest.mark.parametrize("loader", ["Pipeline.from_pretrained", "load_pipeline_folder"])
def test_damaged_tensors_are_refused_before_any_weight_is_read(folder, loader, monkeypatch):
    import diffusers.pipelines.pipeline_utils as pipeline_utils

    def no_weights(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(pipeline_utils, "load_sub_model", no_weights)
    monkeypatch.setattr(loading, "load_component", no_weights)
    _damage_tensor(folder, "vae", "missing")
    with pytest.raises(ValueError, match=r"component `vae` \(vae/diffusion_pytorch_model\.safetensors\): 1 missing"):
        LOADERS[loader](folder, dtype=torch.float32)


def _edit_index(folder, edit):
    path = folder / "model_index.json"
    index = json.loads(path.read_text())
    path.write_text(json.dumps(edit(index)))


def _drop_offsets(folder):
    import struct

    path = _weights(folder, "vae")
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    key = sorted(k for k in header if k != "__metadata__")[0]
    del header[key]["data_offsets"]
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + size :])
    return key


DAMAGED_STRUCTURE = {
    "model_index.json a list": (
        lambda f: (f / "model_index.json").write_text("[1, 2]"),
        r"the folder \(model_index\.json\): holds a JSON list, not an object \(damaged\)",
    ),
    "a [null, null] component": (
        lambda f: _edit_index(f, lambda i: {**i, "vae": [None, None]}),
        r"component `vae` \(model_index\.json\): is \[null, null\] \(saved without it\), but "
        r"SkyReelsV3TalkingAvatarPipeline needs a `vae`",
    ),
    "an entry that is not a pair": (
        lambda f: _edit_index(f, lambda i: {**i, "vae": "diffusers"}),
        r"the folder \(model_index\.json\): entry `vae` is \"diffusers\", not \[library, class\] \(damaged\)",
    ),
    "a safetensors entry without offsets": (
        _drop_offsets,
        r"component `vae` \(vae/diffusion_pytorch_model\.safetensors\): tensor `.+` has no valid dtype, shape and "
        r"data_offsets in the header \(damaged\)",
    ),
}


@pytest.mark.parametrize("loader", ["Pipeline.from_pretrained", "load_pipeline_folder"])
@pytest.mark.parametrize("damage", list(DAMAGED_STRUCTURE))
def test_damaged_folder_structure_is_one_line_naming_the_file(folder, loader, damage):
    """Before: `TypeError: pop expected at most 1 argument` (a list), a pipeline built without its VAE, `KeyError:
    'data_offsets'`; now one `ValueError` line naming the folder and the file."""
    make, pattern = DAMAGED_STRUCTURE[damage]
    make(folder)
    with pytest.raises(ValueError, match=pattern) as error:
        LOADERS[loader](folder, dtype=torch.float32)
    assert "\n" not in str(error.value) and str(folder) in str(error.value)


def test_components_passed_in_are_used_and_not_checked(saved, folder):
    """A `[null, null]` component is fine when the caller passes it (as the CLI does for encoders a rank skips)."""
    _edit_index(folder, lambda i: {**i, "vae": [None, None]})
    vae = saved[1].vae
    pipe = AVATAR.from_pretrained(folder, vae=vae, dtype=torch.float32)
    assert pipe.vae is vae


@pytest.mark.parametrize("damage", ["model_index.json a list", "a [null, null] component"])
def test_the_command_line_answers_damaged_structure_with_one_line(folder, tmp_path, capsys, damage):
    """Before: `AttributeError: 'list' object has no attribute 'get'` from the command line's folder check; a
    `[null, null]` VAE passed every check and failed after loading."""
    import numpy as np
    import PIL.Image

    from skyreels_diffusers.app.cli import main
    from tests.reliability.fault_cases import _wav

    image = tmp_path / "face.png"
    PIL.Image.fromarray(np.full((64, 48, 3), 128, np.uint8)).save(image)
    make, pattern = DAMAGED_STRUCTURE[damage]
    make(folder)
    argv = ["generate", "--task", "talking_avatar", "--model", str(folder), "--input-image", str(image)]
    argv += ["--input-audio", str(_wav(tmp_path / "a.wav", 1.0)), "--steps", "1", "--output", str(tmp_path / "o.mp4")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --model: ") or err.startswith("error: model folder"), err
    assert len(err.splitlines()) == 1 and "model_index.json" in err, err
    assert not (tmp_path / "o.mp4").exists()
