"""Gradio's progress bar receives the denoising steps: the Generate handler is called the way Gradio calls it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest


pytest.importorskip("gradio", reason="the web app extra (gradio) is not installed")

from skyreels_diffusers.app.web import JobRunner, build_app


def test_gradio_sees_a_progress_parameter_and_the_job_reports_each_step(tmp_path):
    """Before: `progress=gr.Progress()` was keyword-only after `*values`; Gradio reads special parameters by position
    only, so it never tracked progress (tracks_progress False) and the bar stayed empty for the whole job."""
    from gradio.helpers import special_args

    demo = build_app(model="tiny", output_dir=str(tmp_path), runner=JobRunner())
    functions = {fn.api_name: fn for fn in demo.fns.values()}
    for task in ("reference_to_video", "single_shot_extension", "shot_switching_extension", "talking_avatar"):
        assert functions[f"generate_{task}"].tracks_progress, task

    block = functions["generate_reference_to_video"]
    # the tab's inputs in order: reference images (none: the tiny model's built-in examples), prompt, resolution,
    # duration, seed, steps
    values = [None, "a cat", "default", 1, 7, 2]
    visitor = SimpleNamespace(session_hash="visitor-1")
    inputs, progress_index, _, _ = special_args(block.fn, inputs=list(values), request=visitor)
    assert progress_index == len(values) + 1 and inputs[0] is visitor and inputs[1:-1] == values

    reported = []
    inputs[progress_index] = lambda fraction, desc=None, **_: reported.append((fraction, desc))  # Gradio's tracker
    path, download, command, *errors = block.fn(*inputs)
    assert errors == [""] * len(errors) and Path(path).is_file() and download == path
    assert reported == [(0.5, "step 1/2"), (1.0, "step 2/2")]
