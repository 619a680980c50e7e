"""The talking avatar's flow-matching Euler schedule on float timesteps (diffusers has no exact equivalent: its
`FlowMatchEulerDiscreteScheduler` spaces sigmas differently and feeds the model other timesteps)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput


@dataclass
class FlowEulerSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor


class SkyReelsV3FlowEulerScheduler(SchedulerMixin, ConfigMixin):
    r"""
    Euler steps of a flow-matching ODE on float timesteps with a shift.

    `set_timesteps(N)`: `t_k = linspace(T, 1, N)` (float32) followed by 0, each mapped by the shift
    `t' = T * s u / (1 + (s - 1) u)` with `u = t / T`; the model is called with the float `t'_k` (not rounded).
    `step`: `x <- x - v * (t'_k - t'_{k+1}) / T` with the model's velocity `v` (noise - data), in float32.
    For N = 4, s = 11: t' = [1000.0, 956.584, 846.544, 10.891, 0.0].

    Args:
        num_train_timesteps (`int`, defaults to 1000): `T`.
        shift (`float`, defaults to 11.0): the timestep shift `s`.
    """

    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 11.0):
        self.timesteps = None
        self.sigmas = None
        self._step_index = None
        self._begin_index = None
        self.num_inference_steps = None

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        self._begin_index = begin_index

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | None = None,
        timesteps: list[float] | None = None,
    ):
        """`N` steps of the original's schedule, or a custom unshifted schedule: `sigmas` (noise levels in (0, 1]) or
        `timesteps` (`T * sigmas`); the shift is applied to either and a final zero appended."""
        total = self.config.num_train_timesteps
        if sigmas is not None and timesteps is not None:
            raise ValueError("Pass either `sigmas` or `timesteps`, not both.")
        if timesteps is not None:
            sigmas = [float(t) / total for t in timesteps]
        if sigmas is not None:
            base = np.asarray(sigmas, dtype=np.float32) * np.float32(total)
            if base.ndim != 1 or len(base) < 1 or not (np.all(base > 0) and np.all(base <= total)):
                raise ValueError(f"`sigmas` must be a non-empty list of values in (0, 1], got {list(sigmas)!r}.")
            num_inference_steps = len(base)
        elif not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}.")
        else:
            base = np.linspace(total, 1, num_inference_steps, dtype=np.float32)
        t = torch.tensor(np.append(base, np.float32(0.0)).astype(np.float32))
        u = t / total
        shifted = (self.config.shift * u / (1 + (self.config.shift - 1) * u)) * total
        self.num_inference_steps = num_inference_steps
        self.sigmas = (shifted / total).to(device)  # noise level of each step, ends at 0
        self.timesteps = shifted[:-1].to(device)
        self._step_index = None
        self._begin_index = None

    def _init_step_index(self, timestep):
        if self._begin_index is not None:
            self._step_index = self._begin_index
        else:
            self._step_index = int((self.timesteps == timestep.to(self.timesteps.device)).nonzero()[0])

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        if self.timesteps is None:
            raise ValueError("Call `set_timesteps` before `step`.")
        if self._step_index is None:
            self._init_step_index(torch.as_tensor(timestep))
        total = self.config.num_train_timesteps
        t_now = self.sigmas[self._step_index] * total
        t_next = self.sigmas[self._step_index + 1] * total
        prev = sample.float() - model_output.float() * ((t_now - t_next) / total).to(sample.device)
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return FlowEulerSchedulerOutput(prev_sample=prev)

    def add_noise_at(self, clean: torch.Tensor, noise: torch.Tensor, timestep) -> torch.Tensor:
        """`(1 - t/T) * clean + (t/T) * noise`: a sample of the flow at timestep `t` (motion-frame re-noising)."""
        ratio = torch.as_tensor(timestep, dtype=torch.float32, device=clean.device) / self.config.num_train_timesteps
        return (1 - ratio) * clean + ratio * noise

    def __len__(self):
        return self.config.num_train_timesteps
