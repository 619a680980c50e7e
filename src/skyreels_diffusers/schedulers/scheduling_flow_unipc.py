"""UniPC on the original SkyReels-V3 flow-sigma spacing.

diffusers' `UniPCMultistepScheduler(use_flow_sigmas=True)` is the same solver, but since diffusers 0.35 it spaces the
flow sigmas as `linspace(1, 1/T, N + 1)[:-1]` before the shift, while the SkyReels-V3 checkpoints were step-distilled
on `linspace(sigma_max, 0, N + 1)[:-1]` with `sigma_max = 0.999` (or its float32 rounding): for 8 steps the two
schedules differ by up to 2.3e-3 in sigma and by 1-2 in the integer timesteps. This subclass only changes that spacing;
the step is diffusers' own.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler
from diffusers.configuration_utils import register_to_config

# diffusers' pipeline loader finds a component's loading base class among the attributes of the component's module
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401


#: the extension pipelines' `FlowUniPCMultistepScheduler` (Wan2.1's) stores its training sigmas in float32
SIGMA_MAX_FP32 = float(np.float32(0.999))
#: the reference-to-video pipeline's diffusers 0.34 UniPC computes the same spacing from 0.999 in float64
SIGMA_MAX_FP64 = 0.999


def original_flow_sigmas(num_inference_steps: int, sigma_max: float) -> np.ndarray:
    """The original's unshifted flow sigmas of `num_inference_steps` steps: `linspace(sigma_max, 0, N + 1)[:-1]`."""
    return np.linspace(sigma_max, 0.0, num_inference_steps + 1)[:-1]


class SkyReelsV3FlowUniPCScheduler(UniPCMultistepScheduler):
    r"""
    `UniPCMultistepScheduler` with flow sigmas spaced as the original SkyReels-V3 code spaced them.

    `set_timesteps(N)` uses the unshifted sigmas `linspace(flow_sigma_max, 0, N + 1)[:-1]`, then diffusers applies the
    shift `s sigma / (1 + (s - 1) sigma)`, truncates `1000 sigma` to the integer timesteps and appends the final zero
    sigma, exactly as the original. Passing `sigmas=` (unshifted, diffusers' semantics) overrides the spacing.

    Args:
        flow_sigma_max (`float`, defaults to `SIGMA_MAX_FP32`): the first unshifted sigma: `SIGMA_MAX_FP32` (0.999 rounded
            to float32) reproduces the extension pipelines' Wan `FlowUniPCMultistepScheduler`, `SIGMA_MAX_FP64` (0.999)
            the reference-to-video pipeline's diffusers 0.34 UniPC.
        flow_shift (`float`, defaults to 8.0): the timestep shift `s` (5 for reference-to-video, 8 for the extensions).
        Everything else as `UniPCMultistepScheduler`, with the flow-matching defaults the original used.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        solver_order: int = 2,
        prediction_type: str = "flow_prediction",
        use_flow_sigmas: bool = True,
        flow_shift: float = 8.0,
        flow_sigma_max: float = SIGMA_MAX_FP32,
        **kwargs,
    ):
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            solver_order=solver_order,
            prediction_type=prediction_type,
            use_flow_sigmas=use_flow_sigmas,
            flow_shift=flow_shift,
            **kwargs,
        )
        if not 0.0 < flow_sigma_max <= 1.0:
            raise ValueError(f"`flow_sigma_max` must be in (0, 1], got {flow_sigma_max!r}.")

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
    ):
        if sigmas is None and num_inference_steps is not None and self.config.use_flow_sigmas:
            sigmas = original_flow_sigmas(num_inference_steps, self.config.flow_sigma_max)
        elif sigmas is not None:
            sigmas = np.asarray(sigmas, dtype=np.float64)  # (diffusers' UniPC shifts sigmas with array arithmetic)
        super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu)
