"""Lab colour matching of generated clips to the reference image (the talking avatar's drift control).

The sRGB <-> CIE Lab conversion (D65, sRGB gamma) uses the constants of kornia's `rgb_to_lab` / `lab_to_rgb`,
which the original calls; it is written out here so the package does not need kornia.
"""

from __future__ import annotations

import torch


_RGB_TO_XYZ = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_XYZ_TO_RGB = torch.tensor(
    [
        [3.2404813432005266, -1.5371515162713185, -0.4985363261688878],
        [-0.9692549499965682, 1.8759900014898907, 0.0415559265582928],
        [0.0556466391351772, -0.2040413383665112, 1.0573110696453443],
    ]
)
_WHITE = torch.tensor([0.95047, 1.0, 1.08883])


def _mix(matrix: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,...jhw->...ihw", matrix.to(image), image)


def rgb_to_lab(image: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], channels at dim -3 -> Lab (L in [0, 100])."""
    linear = torch.where(image > 0.04045, ((image + 0.055) / 1.055).pow(2.4), image / 12.92)
    xyz = _mix(_RGB_TO_XYZ, linear) / _WHITE.to(image).view(3, 1, 1)
    f = torch.where(xyz > 0.008856, xyz.clamp(min=0.008856).pow(1 / 3), 7.787 * xyz + 4.0 / 29.0)
    fx, fy, fz = f.unbind(-3)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=-3)


def lab_to_rgb(image: torch.Tensor, clip: bool = True) -> torch.Tensor:
    """Lab -> sRGB (clipped to [0, 1] by default)."""
    L, a, b = image.unbind(-3)
    fy = (L + 16.0) / 116.0
    fx = a / 500.0 + fy
    fz = (fy - b / 200.0).clamp(min=0.0)
    f = torch.stack([fx, fy, fz], dim=-3)
    xyz = torch.where(f > 0.2068966, f.pow(3.0), (f - 4.0 / 29.0) / 7.787) * _WHITE.to(image).view(3, 1, 1)
    linear = _mix(_XYZ_TO_RGB, xyz)
    rgb = torch.where(linear > 0.0031308, 1.055 * linear.clamp(min=0.0031308).pow(1 / 2.4) - 0.055, 12.92 * linear)
    return rgb.clamp(0.0, 1.0) if clip else rgb


def match_colors(frames: torch.Tensor, reference: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Match every frame's per-channel Lab mean and (population) std to the reference image's.

    Args:
        frames: `[F, 3, H, W]` in [-1, 1].
        reference: `[3, H, W]` in [-1, 1].
        strength: 1 = fully matched (the original's), 0 = unchanged; blended in RGB.
    Returns `[F, 3, H, W]` in [-1, 1], float32.
    """
    frames01 = (frames.float() + 1) / 2
    lab = rgb_to_lab(frames01)
    ref_lab = rgb_to_lab((reference.float() + 1) / 2)
    ref_mean = ref_lab.mean(dim=(-2, -1), keepdim=True)
    ref_std = ref_lab.std(dim=(-2, -1), keepdim=True, unbiased=False).clamp(min=1e-6)
    mean = lab.mean(dim=(-2, -1), keepdim=True)
    std = lab.std(dim=(-2, -1), keepdim=True, unbiased=False).clamp(min=1e-6)
    matched = lab_to_rgb((lab - mean) / std * ref_std + ref_mean)
    if strength != 1.0:
        matched = strength * matched + (1 - strength) * frames01
    return matched * 2 - 1
