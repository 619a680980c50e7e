"""`scripts/check_copies.py`: the `# Copied from` code of the package equals its source, and a copy that drifts is
caught (and `--fix` rewrites it)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_copies", ROOT / "scripts" / "check_copies.py")
check_copies = sys.modules["check_copies"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_copies)

SHOT = Path("skyreels_diffusers") / "pipelines" / "pipeline_skyreels_v3_shot_switching.py"


def test_copies_equal_their_sources():
    copies = [c for path in (ROOT / "src").rglob("*.py") for c in check_copies.find_copies(path)]
    assert {c.source.rsplit(".", 1)[-1] for c in copies} >= {"__init__", "check_inputs"}  # the checks are not vacuous
    assert check_copies.check() == []


def test_a_drifted_copy_fails_and_fix_rewrites_it(tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "skyreels_diffusers", src / "skyreels_diffusers")
    shot = src / SHOT
    original = shot.read_text()
    drifted = original.replace("num_condition_frames = cls.check_duration(duration)", "num_condition_frames = 9", 1)
    assert drifted != original
    shot.write_text(drifted)

    assert check_copies.main(["--src", str(src)]) == 1
    err = capsys.readouterr().err
    assert "pipeline_skyreels_v3_shot_switching.py" in err and "SkyReelsV3ExtensionPipeline.check_inputs" in err
    assert "+    num_condition_frames = 9" in err

    assert check_copies.main(["--src", str(src), "--fix"]) == 0
    assert shot.read_text() == original
    assert check_copies.main(["--src", str(src)]) == 0
