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


# ---------------------------------------------------------------------------------------------- resume that holds
def test_canonical_form_drops_what_depends_on_the_process():
    from skyreels_diffusers.pipelines.resume import canonical

    class Opaque:  # a default repr carries a memory address
        pass

    a, b = Opaque(), Opaque()
    assert canonical(a) == canonical(b) and "0x" not in canonical(a)
    assert canonical({"s": {"b", "a"}, "t": (1, 2.5)}) == {"s": ["a", "b"], "t": [1, 2.5]}
    config = {"x": 1, "_use_default_values": ["c", "a", "b"], "_name_or_path": "/models/one"}
    moved = {"x": 1, "_use_default_values": ["b", "a", "c"], "_name_or_path": "./elsewhere"}
    assert fingerprint([config]) == fingerprint([moved])  # the same weights read from another path
    assert fingerprint([config]) != fingerprint([{**config, "x": 2}])
    assert canonical(torch.ones(2, dtype=torch.bfloat16)) != canonical(torch.ones(2, dtype=torch.float16))


def _flip_byte(path, offset_from_end=100):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def _saved_store(folder):
    store = ResumeStore(folder, "abc")
    store.save_keyframes(torch.full((2, 3, 4, 4), 0.5))
    store.save_window(0, np.full((69, 4, 4, 3), 7, np.uint8))
    store.save_window(1, np.full((64, 4, 4, 3), 9, np.uint8))
    store.save_state(next_window=2, motion=torch.ones(5, 3, 4, 4), generator=torch.zeros(8, dtype=torch.uint8))
    return store


@pytest.mark.parametrize("damaged", ["window_00001.npy", "state.pt", "keyframes.pt"])
def test_a_flipped_byte_in_any_file_is_refused_naming_it(tmp_path, damaged):
    """Before: a window file with flipped bytes (a bad disk, a bad copy) was resumed silently into the video, up to
    255 levels off; torch.load does not check its own archive either. Now every file's SHA-256 is kept with it."""
    folder = tmp_path / "r"
    _saved_store(folder)
    assert ResumeStore(folder, "abc").load()["next_window"] == 2  # intact: resumes
    if damaged == "window_00001.npy":
        _flip_byte(folder / damaged)  # inside the frames: np.load reads it without complaint
        assert np.load(folder / damaged).max() != 9
    else:  # inside a tensor's bytes: torch.load reads it without complaint
        key = "motion" if damaged == "state.pt" else "keyframes"
        tensor = torch.load(folder / damaged, weights_only=True)[key]
        data = bytearray((folder / damaged).read_bytes())
        data[data.find(tensor.numpy().tobytes()[:16]) + 3] ^= 0xFF
        (folder / damaged).write_bytes(bytes(data))
        assert not torch.equal(torch.load(folder / damaged, weights_only=True)[key], tensor)
    name = damaged.replace(".", r"\.")
    with pytest.raises(ValueError, match=rf"^`resume_dir`: .* holds a damaged (window file )?{name} \(its checksum"):
        ResumeStore(folder, "abc").load()


def test_a_full_disk_mid_run_leaves_no_partial_file_and_the_run_resumes(tmp_path, monkeypatch):
    """Before: the disk filling up while a window was saved ended in a PyTorch-internal traceback and left a partial
    hidden file. Now: one line naming the file, the folder and the reason; the hidden file removed; the state still
    that of the last finished window, from which the same call resumes once there is room."""
    import errno

    from skyreels_diffusers.pipelines import resume

    saves, real_save = [], np.save

    def disk_full_at_window_1(file, array, **kwargs):
        saves.append(len(array))
        if len(saves) == 2:
            file.write(b"\x93NUMPY partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(file, array, **kwargs)

    folder = tmp_path / "r"
    monkeypatch.setattr(resume.np, "save", disk_full_at_window_1)
    with pytest.raises(ValueError) as error:
        run_avatar(folder)
    message = str(error.value)
    assert message.startswith(f"`resume_dir`: cannot write window_00001.npy in {folder} (No space left on device)")
    assert "run the same command again to resume" in message and "\n" not in message
    assert sorted(p.name for p in folder.iterdir()) == ["keyframes.pt", "state.pt", "window_00000.npy"]
    assert torch.load(folder / "state.pt", weights_only=True)["next_window"] == 1
    monkeypatch.setattr(resume.np, "save", real_save)
    resumed = run_avatar(folder).frames[0]
    np.testing.assert_array_equal(resumed, run_avatar(None).frames[0])


def test_unwritable_or_full_resume_folder_is_refused_before_any_model_work(tmp_path, monkeypatch):
    """Before: a read-only or full disk failed after the first clip. Now `check_inputs` (no weights) probes the folder
    (a file written and removed; nothing created) and compares the disk's free space with the run's files."""
    import errno
    import shutil
    from collections import namedtuple

    from skyreels_diffusers.pipelines import SkyReelsV3TalkingAvatarPipeline, resume
    from skyreels_diffusers.pipelines.pipeline_skyreels_v3_talking_avatar import resume_bytes

    def check(folder, frames=1000):
        SkyReelsV3TalkingAvatarPipeline.check_inputs(
            image=random_image(60, 40),
            audio_embeds=features(frames),
            prompt="a",
            height=480,
            width=832,
            resume_dir=folder,
        )

    real_open = open

    def read_only(path, mode="r", *args, **kwargs):
        if "resume-probe" in str(path):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(resume, "open", read_only, raising=False)
    with pytest.raises(
        ValueError, match=r"^`resume_dir`: cannot write in .* \(Read-only file system\); give a folder"
    ):
        check(tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()  # nothing created by a refused check
    monkeypatch.undo()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 10**8, 10**8))
    needed = resume_bytes(1000, 480, 832)
    assert 1000 * 480 * 832 * 3 < needed < 1.15 * 1000 * 480 * 832 * 3  # the frames, a few keyframes and the state
    with pytest.raises(
        ValueError, match=r"^`resume_dir`: .* is on a disk with 95\.4 MiB free; the run's resume files "
    ):
        check(tmp_path / "run")
    check(tmp_path / "run", frames=80)  # one clip: nothing is saved, nothing needed
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"^`resume_dir`: cannot create the folder .*file/run \(.*file is a file\)"):
        check(tmp_path / "file" / "run")


_NEW_PROCESS = """
import sys

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from skyreels_diffusers.app.cli import main
from skyreels_diffusers.app.tiny import tiny_pipeline
from skyreels_diffusers.pipelines.resume import fingerprint
from tests.helpers import random_image
from tests.pipelines.test_talking_avatar import features

assert main(["generate", *sys.argv[1:]]) == 0
pipe = tiny_pipeline("talking_avatar", seed=0)
pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=11.0)  # built with one keyword: many default values
run = pipe.windows(image=random_image(60, 40), prompt="a", generator=torch.Generator().manual_seed(0), height=32,
                   width=48, audio_embeds=features(209))
print(run.fingerprint(), fingerprint([{"names": {"alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta"}}]))
"""


@pytest.mark.slow
def test_a_finished_run_resumes_in_new_processes_with_other_hash_seeds(tmp_path):
    """`skyreels-v3 generate --model tiny ... --resume-dir R` finished; the same command in a new process (another
    hash seed) resumes every window from R, and the videos are the same. The fingerprint of a run whose scheduler
    was built with keywords (diffusers lists its default values from a set) and of a set is the same in both
    processes. Before: those changed with the hash seed, and a killed run restarted by a new process (or continued
    by another server replica) had its resume folder refused as "a different run"."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from skyreels_diffusers.pipelines.video_io import load_video

    root = Path(__file__).resolve().parents[2]
    command = [
        sys.executable, "-c", _NEW_PROCESS, "--task", "talking_avatar", "--model", "tiny", "--steps", "1",
        "--height", "32", "--width", "32", "--device", "cpu", "--crf", "0", "--resume-dir", str(tmp_path / "R"),
    ]  # fmt: skip
    stamps, prints = None, set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": f"{root / 'src'}:{root}", "OMP_NUM_THREADS": "1"}
        output = tmp_path / f"out{seed}.mp4"
        done = subprocess.run([*command, "--output", str(output)], env=env, cwd=root, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        prints.add(done.stdout.strip().splitlines()[-1])
        windows = sorted((tmp_path / "R").glob("window_*.npy"))
        assert windows and (stamps is None or stamps == [w.stat().st_mtime_ns for w in windows])  # none redone
        stamps = [w.stat().st_mtime_ns for w in windows]
    assert len(prints) == 1, prints
    np.testing.assert_array_equal(load_video(tmp_path / "out1.mp4")[0], load_video(tmp_path / "out2.mp4")[0])
