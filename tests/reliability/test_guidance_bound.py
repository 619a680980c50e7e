"""Guidance scales have a documented upper bound (before: any finite value, and 1e30 gave a flat grey video with exit
code 0); every pipeline refuses a scale outside [1, 20] by name before any model work."""

from __future__ import annotations

import math

import pytest

from skyreels_diffusers.pipelines.common import MAX_GUIDANCE_SCALE, check_guidance_scale
from skyreels_diffusers.pipelines.errors import PipelineInputError
from tests.helpers import random_image
from tests.pipelines.test_bad_inputs import poisoned


@pytest.mark.parametrize("value", [1, 1.0, 5.0, 7.5, MAX_GUIDANCE_SCALE])
def test_scales_the_original_and_real_use_need_are_accepted(value):
    check_guidance_scale("guidance_scale", value)


@pytest.mark.parametrize("value", [1e30, 20.5, math.inf, math.nan, 0.99, -1, True, "5"])
def test_scales_outside_the_bound_are_refused_by_name(value):
    with pytest.raises(PipelineInputError) as error:
        check_guidance_scale("audio_guidance_scale", value)
    assert error.value.argument == "audio_guidance_scale"
    assert str(error.value) == (
        f"`audio_guidance_scale` must be a number in [1, 20] (1 = guidance off; the original uses 1 to 7.5), "
        f"got {value!r}."
    )


@pytest.mark.parametrize("argument", ["guidance_scale", "guidance_scale_img"])
def test_the_reference_pipeline_refuses_1e30_before_any_model_work(argument):
    kwargs = dict(ref_images=[random_image()], prompt="a cat", num_frames=5, height=32, width=48)
    with pytest.raises(PipelineInputError, match=rf"^`{argument}` must be a number in \[1, 20\]"):
        poisoned("reference_to_video")(**kwargs, **{argument: 1e30})
