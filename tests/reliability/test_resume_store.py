"""Resume folders: one clear line for a folder that cannot be this run's, and a fingerprint that covers everything
that changes the frames (weights, dtype, quantisation, scheduler, inputs, seed, settings)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from skyreels_diffusers.app.tiny import tiny_pipeline, tiny_transformer
from skyreels_diffusers.pipelines.resume import ResumeStore, fingerprint, module_identity
from tests.helpers import random_image
from tests.pipelines.test_talking_avatar import features


class Killed(Exception):
    pass


def run_avatar(resume_dir, pipe=None, kill_at=None, **kwargs):
    pipe = pipe or tiny_pipeline("talking_avatar")
    pipe.set_progress_bar_config(disable=True)

    def on_window(_pipe, window, total):
        if window == kill_at:
            raise Killed

    return pipe(
        image=random_image(60, 40),
        prompt="a woman talks",
        generator=torch.Generator().manual_seed(0),
        height=32,
        width=48,
        audio_embeds=features(209),
        resume_dir=resume_dir,
        callback_on_window_end=on_window,
        **kwargs,
    )


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """A resume folder of a tiny avatar run killed after its first window (state + window_00000.npy)."""
    folder = tmp_path_factory.mktemp("resume") / "run"
    with pytest.raises(Killed):
        run_avatar(folder, kill_at=1)
    assert (folder / "state.pt").is_file() and (folder / "window_00000.npy").is_file()
    return folder


def _copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "copy")


def test_resume_dir_that_is_a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    with pytest.raises(ValueError, match=r"^`resume_dir`: .*a_file is a file; give a folder"):
        run_avatar(path)


@pytest.mark.parametrize("content", ["garbage", "foreign_pickle", "model_weights"])
def test_garbage_or_foreign_state_is_refused_without_unsafe_advice(tmp_path, content):
    folder = tmp_path / "run"
    folder.mkdir()
    if content == "garbage":
        (folder / "state.pt").write_bytes(b"\x00not a torch file" * 50)
    elif content == "foreign_pickle":
        torch.save({"object": ValueError("something else")}, folder / "state.pt")  # not loadable weights_only
    else:
        torch.save(torch.nn.Linear(2, 2).state_dict(), folder / "state.pt")  # a readable file of another kind
    with pytest.raises(ValueError) as error:
        run_avatar(folder)
    message = str(error.value)
    assert message.startswith("`resume_dir`: ") and "is not a resume state of skyreels-diffusers" in message
    assert "weights_only" not in message and "\n" not in message


@pytest.mark.slow
def test_deleted_window_file_is_named(killed_run, tmp_path):
    folder = _copy(killed_run, tmp_path)
    (folder / "window_00000.npy").unlink()
    with pytest.raises(ValueError, match=r"^`resume_dir`: .* lacks the finished window file\(s\) window_00000\.npy"):
        run_avatar(folder)


@pytest.mark.slow
def test_damaged_window_file_is_named(killed_run, tmp_path):
    folder = _copy(killed_run, tmp_path)
    (folder / "window_00000.npy").write_bytes(b"\x93NUMPY junk")
    with pytest.raises(ValueError, match=r"^`resume_dir`: .* damaged window file window_00000\.npy"):
        run_avatar(folder)


@pytest.mark.slow
def test_other_transformer_weights_do_not_resume(killed_run, tmp_path):
    """Before: the fingerprint ignored the weights, and a run with other weights resumed silently (mixed video)."""
    folder = _copy(killed_run, tmp_path)
    pipe = tiny_pipeline("talking_avatar")
    pipe.transformer = tiny_transformer("avatar", seed=1)
    with pytest.raises(ValueError, match=r"^`resume_dir`: .* holds a different run .*weights"):
        run_avatar(folder, pipe=pipe)


def test_fingerprint_covers_weights_dtype_quantisation_and_config():
    base = tiny_transformer("avatar", seed=0)
    same = tiny_transformer("avatar", seed=0)
    assert fingerprint(module_identity(base)) == fingerprint(module_identity(same))
    other_weights = tiny_transformer("avatar", seed=0)
    with torch.no_grad():
        next(other_weights.parameters()).view(-1)[0] += 1e-3  # one value of the first sampled tensor
    bf16 = tiny_transformer("avatar", seed=0).to(torch.bfloat16)
    fp8_storage = tiny_transformer("avatar", seed=0)
    fp8_storage.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    other_config = tiny_transformer("avatar", seed=0)
    other_config.register_to_config(rope_max_seq_len=999)
    prints = {fingerprint(module_identity(m)) for m in (base, other_weights, bf16, fp8_storage, other_config)}
    assert len(prints) == 5
    assert fingerprint([{"shift": 11.0}]) != fingerprint([{"shift": 5.0}])
    assert fingerprint(torch.zeros(3)) != fingerprint(torch.ones(3)) and module_identity(None) is None


def test_store_writes_atomically_only_as_writer(tmp_path):
    reader = ResumeStore(tmp_path / "r", "abc", writer=False)
    reader.save_keyframes(torch.zeros(2, 3, 4, 4))
    reader.save_state(next_window=0, motion=None, generator=torch.zeros(1))
    reader.save_window(0, np.zeros((1, 2, 2, 3), np.uint8))
    assert list((tmp_path / "r").iterdir()) == []
    writer = ResumeStore(tmp_path / "r", "abc", writer=True)
    writer.save_keyframes(torch.full((2, 3, 4, 4), 0.5))
    writer.save_window(0, np.full((1, 2, 2, 3), 7, np.uint8))
    writer.save_state(next_window=1, motion=None, generator=torch.zeros(1))
    names = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert names == ["keyframes.pt", "state.pt", "window_00000.npy"]  # no temp files
    state = reader.load()
    assert state["next_window"] == 1 and reader.windows(1)[0].max() == 7 and state["keyframes"].max() == 0.5
    with pytest.raises(ValueError, match="holds a different run"):
        ResumeStore(tmp_path / "r", "xyz").load()


def test_state_without_its_keyframes_or_of_an_earlier_version_is_refused(tmp_path):
    store = ResumeStore(tmp_path / "r", "abc")
    store.save_state(next_window=0, motion=None, generator=torch.zeros(1))
    with pytest.raises(ValueError, match=r"^`resume_dir`: .* lacks the keyframes\.pt its state refers to"):
        store.load()
    torch.save({"fingerprint": "other", "keyframes": torch.zeros(1)}, tmp_path / "r" / "keyframes.pt")
    with pytest.raises(ValueError, match=r"holds a keyframes\.pt of a different run"):
        store.load()
    (tmp_path / "r" / "keyframes.pt").write_bytes(b"PK junk" * 20)
    with pytest.raises(ValueError, match=r"holds a damaged keyframes\.pt"):
        store.load()
    # the layout before keyframes.pt: the whole keyframe clip in every state.pt
    old = {"fingerprint": "abc", "keyframe_video": torch.zeros(1), "next_window": 0, "motion": None}
    torch.save({**old, "generator": torch.zeros(1)}, tmp_path / "r" / "state.pt")
    with pytest.raises(ValueError, match=r"holds a state\.pt of an earlier version of skyreels-diffusers"):
        store.load()


@pytest.mark.slow
def test_keyframes_are_written_once_and_the_state_stays_small(killed_run):
    """Before: every state.pt held the whole colour-matched keyframe clip (81 float frames; 388 MB at 480P), rewritten
    after every window. Now: the frames the windows use, once, and a state of a few motion frames (not the storage of
    the whole window they are a view of)."""
    keyframes = torch.load(killed_run / "keyframes.pt", weights_only=True)["keyframes"]
    state = torch.load(killed_run / "state.pt", weights_only=True)
    assert keyframes.shape == (3, 3, 32, 48)  # one per window of the 209-frame run
    assert state["next_window"] == 1 and state["motion"].shape == (5, 3, 32, 48)  # killed after window 0
    assert (killed_run / "state.pt").stat().st_size < state["motion"].numel() * 4 + 8192  # the motion frames alone
