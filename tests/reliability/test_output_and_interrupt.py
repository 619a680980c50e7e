"""A finished generation is never lost to an unwritable output, and Ctrl-C says how to go on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import skyreels_diffusers.app.output as output
import skyreels_diffusers.app.run as run_module
from skyreels_diffusers.app.cli import main


def test_unwritable_output_is_refused_before_any_model_work(monkeypatch, capsys):
    monkeypatch.setattr(
        run_module, "load_pipeline", lambda request: pytest.fail("model loaded before the output check")
    )
    code = main(["generate", "--task", "reference_to_video", "--model", "tiny", "--output", "/proc/x.mp4"])
    assert code == 2
    assert "--output: cannot write to /proc" in capsys.readouterr().err


def test_a_failed_final_write_keeps_the_frames(monkeypatch, tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(output, "write_video", disk_full)
    with pytest.raises(ValueError, match="--output: writing .* failed \\(No space left on device\\)") as error:
        output.write_or_keep(frames, tmp_path / "out.mp4", fps=24)
    kept = Path(str(error.value).split("kept in ")[1].split(" ")[0])
    try:
        np.testing.assert_array_equal(np.load(kept), frames)
    finally:
        kept.unlink()


@pytest.mark.parametrize(
    "resume, hint", [(True, "run the same command again to resume"), (False, "nothing was written")]
)
def test_ctrl_c_prints_one_line_with_what_to_do(monkeypatch, capsys, tmp_path, resume, hint):
    def interrupted(request):
        raise KeyboardInterrupt

    monkeypatch.setattr("skyreels_diffusers.app.cli.run", interrupted)
    argv = ["generate", "--task", "talking_avatar", "--model", "tiny"]
    if resume:
        argv += ["--resume-dir", str(tmp_path / "r")]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and hint in err[0] and "Traceback" not in err[0]
