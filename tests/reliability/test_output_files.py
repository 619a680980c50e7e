"""The written mp4: the permissions of a plain write (the umask's), no temporary file left by a failed, interrupted or
killed write, and a file that exists is not replaced unless asked."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import skyreels_diffusers.pipelines.video_io as video_io
from skyreels_diffusers.pipelines.video_io import sweep_stale_temp_files, write_video


FRAMES = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)


@pytest.fixture
def umask():
    """Set a umask for the test, restored afterwards."""
    previous = os.umask(0o022)
    os.umask(previous)

    def set_(mask):
        os.umask(mask)

    yield set_
    os.umask(previous)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_the_output_has_the_umasks_permissions(tmp_path, umask, mask, mode):
    """Before: always 0o600 (mkstemp's mode survived the rename)."""
    umask(mask)
    path = write_video(FRAMES, tmp_path / "out.mp4", fps=24)
    assert path.stat().st_mode & 0o777 == mode


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name != "out.mp4")


@pytest.mark.parametrize("error", [RuntimeError("encoder broke"), KeyboardInterrupt(), SystemExit(143)])
def test_an_interrupted_write_leaves_no_temporary_file(tmp_path, monkeypatch, error):
    def broken(filename, *args):
        with open(filename, "wb") as file:
            file.write(b"half an mp4")
        raise error

    monkeypatch.setattr(video_io, "_encode_mp4", broken)
    with pytest.raises(type(error)):
        write_video(FRAMES, tmp_path / "out.mp4", fps=24)
    assert list(tmp_path.iterdir()) == []


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_next_write_sweeps_temporary_files_of_dead_writers_only(tmp_path):
    """Before: a kill during the final write left `.out.XXXX.mp4` for ever, with nothing to tell whose it was."""
    dead = tmp_path / f".out.mp4.{_dead_pid()}.1a2b3c4d.tmp"
    alive = tmp_path / f".out.mp4.{os.getppid()}.5e6f7a8b.tmp"  # a live process (our parent) still writing
    # another output's temp (the web app's unique names are never written twice): swept as well
    other_output = tmp_path / f".other-1b2c.mp4.{_dead_pid()}.1a2b3c4d.tmp"
    other_alive = tmp_path / f".other-1b2c.mp4.{os.getppid()}.1a2b3c4d.tmp"
    not_ours = [tmp_path / ".out.mp4.notes.tmp", tmp_path / f".out.mp4.{_dead_pid()}.xyz.tmp", tmp_path / "a.tmp"]
    for path in (dead, alive, other_output, other_alive, *not_ours):
        path.write_bytes(b"x")
    write_video(FRAMES, tmp_path / "out.mp4", fps=24)
    assert (tmp_path / "out.mp4").is_file()
    assert not dead.exists() and not other_output.exists()
    assert alive.exists() and other_alive.exists() and all(path.exists() for path in not_ours)
    stale = tmp_path / f".third.mp4.{_dead_pid()}.00ff00ff.tmp"
    stale.write_bytes(b"x")
    assert sweep_stale_temp_files(tmp_path / "any.mp4") == [stale]


@pytest.mark.slow
def test_sigterm_during_the_write_removes_the_temporary_file(tmp_path):
    """A SIGTERM while the mp4 is encoded (the default action would kill past every clean-up) exits with 143 and
    leaves nothing."""
    script = f"""
import os, signal, sys
import numpy as np
import skyreels_diffusers.pipelines.video_io as video_io

def encode(filename, *args):
    open(filename, "wb").write(b"half")
    os.kill(os.getpid(), signal.SIGTERM)

video_io._encode_mp4 = encode
video_io.write_video(np.zeros((1, 16, 16, 3), np.uint8), {str(tmp_path / "out.mp4")!r}, fps=24)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 143, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_overwrite_false_never_replaces_a_file(tmp_path):
    path = tmp_path / "out.mp4"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        write_video(FRAMES, path, fps=24, overwrite=False)
    assert path.read_bytes() == b"precious" and _leftovers(tmp_path) == []
    write_video(FRAMES, path, fps=24)  # the pipeline API's default replaces, as before
    assert path.read_bytes() != b"precious"


class _FakePipe:
    """Stands in for a loaded pipeline: returns two frames at once."""

    calls = 0

    def __call__(self, **kwargs):
        from types import SimpleNamespace

        _FakePipe.calls += 1
        return SimpleNamespace(frames=[FRAMES])


def test_an_existing_output_is_refused_before_any_model_work(tmp_path, monkeypatch, capsys):
    """Before: --output silently replaced the file at the end of the run."""
    import skyreels_diffusers.app.run as run_module
    from skyreels_diffusers.app.cli import main

    monkeypatch.setattr(run_module, "load_pipeline", lambda request: pytest.fail("model loaded before the check"))
    output = tmp_path / "out.mp4"
    output.write_bytes(b"precious")
    code = main(["generate", "--task", "reference_to_video", "--model", "tiny", "--output", str(output)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"error: --output: {output} exists; pass --overwrite to replace it or pick another name"]
    assert output.read_bytes() == b"precious"

    monkeypatch.setattr(run_module, "load_pipeline", lambda request: _FakePipe())
    code = main(
        ["generate", "--task", "reference_to_video", "--model", "tiny", "--output", str(output), "--overwrite"]
    )
    assert code == 0 and output.read_bytes() != b"precious" and _leftovers(tmp_path) == []


def test_default_names_within_one_second_do_not_collide(tmp_path, monkeypatch, capsys):
    """Before: result/<task>/<seed>_<second>.mp4: a second run in the same second replaced the first's video."""
    import time

    import skyreels_diffusers.app.run as run_module
    from skyreels_diffusers.app.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt, *args: "2026-11-29_12-00-00")
    monkeypatch.setattr(run_module, "load_pipeline", lambda request: _FakePipe())
    argv = ["generate", "--task", "reference_to_video", "--model", "tiny", "--steps", "1"]
    paths = []
    for _ in range(3):
        assert main(argv) == 0
        paths.append(capsys.readouterr().out.strip().splitlines()[-1])
    assert paths == [
        "result/reference_to_video/42_2026-11-29_12-00-00.mp4",
        "result/reference_to_video/42_2026-11-29_12-00-00-1.mp4",
        "result/reference_to_video/42_2026-11-29_12-00-00-2.mp4",
    ]
    assert all((tmp_path / p).is_file() and (tmp_path / p).stat().st_size > 0 for p in paths)


def test_a_default_name_taken_during_the_run_gets_the_next_one(tmp_path):
    """Another process may finish under the same default name while this run generates: neither video is lost."""
    import skyreels_diffusers.app.output as output

    taken = tmp_path / "42_now.mp4"
    taken.write_bytes(b"the other run's video")
    path = output.write_or_keep(FRAMES, taken, unique=True, fps=24)
    assert path == tmp_path / "42_now-1.mp4" and path.is_file() and taken.read_bytes() == b"the other run's video"
    with pytest.raises(
        ValueError, match="--output: writing .*42_now.mp4 failed \\(it appeared during the run; pass --overwrite"
    ) as error:
        output.write_or_keep(FRAMES, taken, fps=24)  # an explicit --output: kept, reported, never replaced
    kept = str(error.value).split("kept in ")[1].split(" ")[0]
    np.testing.assert_array_equal(np.load(kept), FRAMES)
    os.unlink(kept)
