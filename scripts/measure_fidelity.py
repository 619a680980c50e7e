"""How far each default convention of this package moves a video from the original's, measured on the pipeline golden
cases (tests/fixtures/pipelines/: tiny random components, real inputs at 480P, fp32, CPU).

    python scripts/measure_fidelity.py --json fidelity.json

For each case it runs the original's conventions (`reproduce_original=True`, which the golden tests prove equal to the
original), then this package's defaults, then the original's conventions on diffusers 0.42.1's stock flow-sigma
spacing (what the package gave before the exact schedule), and reports the final-latent and uint8-frame differences
against the first run. Each run takes a few minutes on two cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from skyreels_diffusers.pipelines.video_io import load_image, to_uint8
from tests.pipelines.test_golden_pipelines import PIPELINES, PipelineCase, pipeline


CASES = {
    "reference_to_video": ("SkyReelsV3ReferencePipeline", "reference"),
    "shot_switching_extension": ("SkyReelsV3ShotSwitchingPipeline", "extension"),
}
STOCK_SIGMAS = np.linspace(1.0, 1 / 1000, 9)[:-1]  # diffusers 0.42.1's unshifted flow sigmas for 8 steps


def run_case(name: str, pipe, case: PipelineCase, **kwargs) -> tuple[torch.Tensor, np.ndarray]:
    spec, latents = case.meta["spec"], []
    common = dict(
        prompt_embeds=case.tensors["prompt_embeds"],
        resolution=spec["resolution"],
        num_inference_steps=8,
        generator=torch.Generator("cpu").manual_seed(spec["seed"]),
        output_type="np",
        callback_on_step_end=lambda p, i, t, d: latents.append(d["latents"]) or {},
        **kwargs,
    )
    if name == "reference_to_video":
        refs = [load_image(PIPELINES / "inputs" / r) for r in spec["refs"]]
        frames = pipe(ref_images=refs, num_frames=case.meta["info"]["num_frames"], **common).frames[0]
    else:
        frames = pipe(video=str(PIPELINES / "inputs" / spec["video"]), duration=spec["duration"], **common).frames[0]
    return latents[-1], to_uint8(frames)


def compare(reference: tuple, other: tuple) -> dict:
    (lat_a, frames_a), (lat_b, frames_b) = reference, other
    diff = np.abs(frames_a.astype(np.int16) - frames_b.astype(np.int16))
    return {
        "latents_rel_l2": ((lat_b - lat_a).norm() / lat_a.norm()).item(),
        "frames_mean_abs_levels": float(diff.mean()),
        "frames_max_abs_levels": int(diff.max()),
        "frames_pixels_differing": float((diff > 0).mean()),
        "frames_mean_signed_levels": float((frames_b.astype(np.float64) - frames_a).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from skyreels_diffusers import pipelines

    results = {}
    for name in args.cases:
        class_name, variant = CASES[name]
        case = PipelineCase(name)
        with tempfile.TemporaryDirectory() as tmp:
            pipe = pipeline(getattr(pipelines, class_name), name, case, variant, Path(tmp))
        original = run_case(name, pipe, case, reproduce_original=True)
        results[name] = {
            "defaults": compare(original, run_case(name, pipe, case)),
            "stock_diffusers_sigmas": compare(
                original, run_case(name, pipe, case, reproduce_original=True, sigmas=STOCK_SIGMAS)
            ),
        }
        print(name, json.dumps(results[name], indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
