"""The converter leaves no lost disk: its temporary folder goes on an error, Ctrl-C or SIGTERM, folders left by a
killed run are swept by the next one, and a destination that is a file is one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from skyreels_diffusers.app import convert
from skyreels_diffusers.app.convert import check_destination, convert_repo, sweep_stale_conversions
from tests.conversion.original_repos import build_reference_repo


ROOT = Path(__file__).resolve().parents[2]
DEAD_PID = 999_999_999  # above any pid_max: never a live process


def _script():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import convert_checkpoints
    finally:
        sys.path.pop(0)
    return convert_checkpoints


@pytest.fixture(scope="module")
def orig(tmp_path_factory) -> Path:
    """A tiny original reference-to-video repo."""
    folder = tmp_path_factory.mktemp("repo") / "orig"
    build_reference_repo(folder)
    return folder


def test_a_destination_that_is_a_file_is_one_line(tmp_path, capsys, orig):
    """Before: `NotADirectoryError: [Errno 20] Not a directory` traceback from `dst.iterdir()`."""
    target = tmp_path / "conv"
    target.write_text("x")
    code = _script().main(["repo", "--task", "reference_to_video", str(orig), str(target)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err == f"error: {target} is a file; give a folder (it is created when missing)"
    assert target.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["conv"]


def test_a_destination_under_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"file is a file, so .*file/sub/conv cannot be created"):
        check_destination(tmp_path / "file" / "sub" / "conv")


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_conversion_leaves_nothing(tmp_path, orig, monkeypatch, interrupt):
    def stop(*args, **kwargs):
        (args[0] / "half-written.safetensors").parent.mkdir(parents=True, exist_ok=True)
        (args[0] / "half-written.safetensors").write_bytes(b"\0" * 1000)
        raise interrupt("stop")

    monkeypatch.setattr(convert, "_save_components", stop)
    with pytest.raises(interrupt):
        convert_repo("reference_to_video", orig, tmp_path / "conv")
    assert list(tmp_path.iterdir()) == []


def _leftover(parent: Path, name: str, host: str, pid: int) -> Path:
    folder = parent / f".{name}.{host}.{pid}.0123abcd.tmp"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 4096)
    return folder


def test_leftovers_of_killed_runs_are_swept_and_nothing_else(tmp_path):
    """Before: `.conv.XXXXXXXX` folders of SIGKILLed runs (whole converted components) stayed forever."""
    host = convert._host()
    dead = _leftover(tmp_path, "conv", host, DEAD_PID)
    dead_other_name = _leftover(tmp_path, "other", host, DEAD_PID)
    alive = _leftover(tmp_path, "conv", host, os.getpid())
    other_host = _leftover(tmp_path, "conv", "another-host", DEAD_PID)
    unrelated = tmp_path / ".conv.notes"
    unrelated.mkdir()
    assert sorted(sweep_stale_conversions(tmp_path / "conv")) == sorted([dead, dead_other_name])
    assert sorted(tmp_path.iterdir()) == sorted([alive, other_host, unrelated])


def test_a_conversion_sweeps_before_it_writes(tmp_path, orig):
    dead = _leftover(tmp_path, "conv", convert._host(), DEAD_PID)
    [folder] = convert_repo("reference_to_video", orig, tmp_path / "conv")
    assert not dead.exists() and folder == tmp_path / "conv"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv"]
    assert (folder / "model_index.json").is_file()


@pytest.mark.slow
def test_sigterm_during_a_conversion_removes_the_temporary_folder(tmp_path, orig):
    """Before: SIGTERM (the default action) killed the process past every clean-up, leaving the hidden folder with
    whole converted components (tens of GB at real size)."""
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT / "scripts")!r})
import convert_checkpoints
from skyreels_diffusers.app import convert

real = convert._save_components
def save_then_terminate(folder, *args):
    real(folder, *args)  # the whole pipeline folder written into the temporary folder
    os.kill(os.getpid(), signal.SIGTERM)

convert._save_components = save_then_terminate
sys.exit(convert_checkpoints.main(["repo", "--task", "reference_to_video", {str(orig)!r}, {str(tmp_path / "conv")!r}]))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 143, result.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []
