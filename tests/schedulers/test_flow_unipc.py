"""The flow-UniPC schedules of the reference and extension tasks against the ORIGINAL's (fixtures) and against an
independent implementation of the original's formula for every step count the CLI accepts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler
from safetensors.torch import load_file

from skyreels_diffusers import (
    SkyReelsV3ExtensionPipeline,
    SkyReelsV3FlowEulerScheduler,
    SkyReelsV3FlowUniPCScheduler,
    SkyReelsV3ReferencePipeline,
    SkyReelsV3ShotSwitchingPipeline,
)
from skyreels_diffusers.app.tiny import tiny_components
from skyreels_diffusers.schedulers.scheduling_flow_unipc import SIGMA_MAX_FP32, SIGMA_MAX_FP64
from tests.helpers import FIXTURES


CASE = json.loads((FIXTURES / "scheduler" / "case.json").read_text())["cases"]
TENSORS = load_file(str(FIXTURES / "scheduler" / "tensors.safetensors"))
# fixture case -> flow_sigma_max of the code that produced it (Wan's FlowUniPC keeps 0.999 in float32)
FLOW_CASES = {
    "flow_unipc_s8_shift8": SIGMA_MAX_FP32,
    "flow_unipc_s8_shift5": SIGMA_MAX_FP32,
    "diffusers_unipc_r2v_s8_shift5": SIGMA_MAX_FP64,
}


def original_schedule(steps: int, shift: float, sigma_max: float) -> tuple[list[int], np.ndarray]:
    """The original's `set_timesteps` written from its description: float64 linspace from sigma_max to 0 (last
    dropped), shifted, integer timesteps by truncation of 1000 sigma, float32 sigmas with a final 0."""
    sigmas = np.array([sigma_max - k * sigma_max / steps for k in range(steps)], dtype=np.float64)
    shifted = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = [int(s * 1000) for s in shifted]
    return timesteps, np.append(shifted, 0.0).astype(np.float32)


@pytest.mark.parametrize("name", sorted(FLOW_CASES))
def test_flow_unipc_matches_the_original_fixture(name):
    case = CASE[name]
    scheduler = SkyReelsV3FlowUniPCScheduler(flow_shift=case["shift"], flow_sigma_max=FLOW_CASES[name])
    scheduler.set_timesteps(case["num_inference_steps"])
    assert scheduler.timesteps.tolist() == case["timesteps"]
    assert scheduler.sigmas.tolist() == np.asarray(case["sigmas"], dtype=np.float32).tolist()
    samples, outputs = TENSORS[f"{name}.samples"], TENSORS[f"{name}.model_outputs"]
    sample = samples[0]
    for i, t in enumerate(scheduler.timesteps):
        sample = scheduler.step(outputs[i], t, sample, return_dict=False)[0]
        scale = samples[i + 1].abs().max()
        assert (sample - samples[i + 1]).abs().max() <= 1e-6 * scale, (name, i)


def test_stock_diffusers_unipc_is_not_the_original_schedule():
    """Why the subclass exists: diffusers 0.42.1 spaces the flow sigmas differently (this test fails the day it
    does not, and the subclass can go)."""
    stock = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0)
    stock.set_timesteps(8)
    assert stock.timesteps.tolist() != CASE["flow_unipc_s8_shift8"]["timesteps"]


@pytest.mark.parametrize("shift", [5.0, 8.0])
@pytest.mark.parametrize("sigma_max", [SIGMA_MAX_FP32, SIGMA_MAX_FP64])
def test_every_cli_step_count_follows_the_original_formula(shift, sigma_max):
    scheduler = SkyReelsV3FlowUniPCScheduler(flow_shift=shift, flow_sigma_max=sigma_max)
    for steps in range(1, 101):
        scheduler.set_timesteps(steps)
        timesteps, sigmas = original_schedule(steps, shift, sigma_max)
        assert scheduler.timesteps.tolist() == timesteps, steps
        np.testing.assert_array_equal(scheduler.sigmas.numpy(), sigmas, err_msg=str(steps))


@pytest.mark.parametrize(
    "pipeline_class, task, case",
    [
        (SkyReelsV3ReferencePipeline, "reference_to_video", "diffusers_unipc_r2v_s8_shift5"),
        (SkyReelsV3ExtensionPipeline, "single_shot_extension", "flow_unipc_s8_shift8"),
        (SkyReelsV3ShotSwitchingPipeline, "shot_switching_extension", "flow_unipc_s8_shift8"),
    ],
)
def test_pipelines_get_the_original_schedule_from_old_and_new_folders(tmp_path, pipeline_class, task, case):
    """Folders converted before the exact schedule hold a stock UniPC: they load and still get the original's
    schedule; folders saved now store `SkyReelsV3FlowUniPCScheduler` with the task's sigma spacing."""
    components = tiny_components(task)
    stock = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=components["scheduler"].config.flow_shift
    )
    stock.save_pretrained(tmp_path / "old_scheduler")
    old = pipeline_class(
        **{**components, "scheduler": UniPCMultistepScheduler.from_pretrained(tmp_path / "old_scheduler")}
    )
    pipeline_class(**components).save_pretrained(tmp_path / "new")
    new = pipeline_class.from_pretrained(tmp_path / "new")
    saved = json.loads((tmp_path / "new" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "SkyReelsV3FlowUniPCScheduler"
    assert saved["flow_sigma_max"] == FLOW_CASES[case]
    for pipe in (old, new):
        assert isinstance(pipe.scheduler, SkyReelsV3FlowUniPCScheduler)
        pipe.scheduler.set_timesteps(8)
        assert pipe.scheduler.timesteps.tolist() == CASE[case]["timesteps"]
        assert pipe.scheduler.sigmas.tolist() == np.asarray(CASE[case]["sigmas"], dtype=np.float32).tolist()


def test_custom_sigmas_follow_diffusers_semantics():
    """`sigmas=` are unshifted: the scheduler shifts them, as diffusers' UniPC does."""
    ours = SkyReelsV3FlowUniPCScheduler(flow_shift=5.0)
    stock = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    custom = [0.9, 0.6, 0.3]
    ours.set_timesteps(sigmas=custom)  # a list works here (diffusers' own UniPC needs an array)
    stock.set_timesteps(sigmas=np.array(custom))
    torch.testing.assert_close(ours.sigmas, stock.sigmas, rtol=0, atol=0)
    assert ours.timesteps.tolist() == stock.timesteps.tolist() == [int(5 * s / (1 + 4 * s) * 1000) for s in custom]


def test_avatar_euler_takes_custom_sigmas_and_timesteps():
    default = SkyReelsV3FlowEulerScheduler(shift=11.0)
    default.set_timesteps(4)
    base = np.linspace(1000, 1, 4, dtype=np.float32) / 1000
    by_sigmas, by_timesteps = SkyReelsV3FlowEulerScheduler(shift=11.0), SkyReelsV3FlowEulerScheduler(shift=11.0)
    by_sigmas.set_timesteps(sigmas=base.tolist())
    by_timesteps.set_timesteps(timesteps=(base * 1000).tolist())
    torch.testing.assert_close(by_sigmas.sigmas, default.sigmas, rtol=0, atol=1e-7)
    torch.testing.assert_close(by_timesteps.timesteps, default.timesteps, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="sigmas"):
        by_sigmas.set_timesteps(sigmas=[1.5, 0.5])
