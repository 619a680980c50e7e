"""Parity with the ORIGINAL SkyReels-V3 code: every golden case goes original folder -> converter ->
`from_pretrained` -> forward, and is compared with the original's stored outputs.

* fp32 cases: ||out - ref|| / ||ref|| <= 1e-5 (same math as the original).
* bf16 cases: our bf16 error against the case's fp32 reference is at most 1.5x the original's own bf16 error.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from skyreels_diffusers.app.convert import convert_transformer
from skyreels_diffusers.models import SkyReelsV3Transformer3DModel
from tests.helpers import FIXTURES, GoldenCase


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def run_case(case: GoldenCase, model: SkyReelsV3Transformer3DModel) -> dict[str, torch.Tensor]:
    """Call our model the way the original was called in this case; return {subcase: output}."""
    outputs = {}
    with torch.no_grad():
        if case.variant == "extension":
            outputs["tensor"] = model(
                case.input("tensor.input.x"), case.input("tensor.input.t"), case.input("tensor.input.context")
            ).sample
            outputs["list"] = model(
                case.input("list.input.x_main"),
                case.input("list.input.t"),
                case.input("list.input.context"),
                condition_hidden_states=[case.input("list.input.x_ctx0")],
            ).sample
        elif case.variant == "reference":
            outputs["refs2"] = model(
                case.input("refs2.input.hidden_states"),
                case.input("refs2.input.timestep"),
                case.input("refs2.input.encoder_hidden_states"),
            ).sample
        else:
            latents = case.input("main.input.x")[None]  # the original takes a list of [C, F, H, W]
            condition = case.input("main.input.y").to(latents.dtype)  # mask (4) | condition latents (16)
            outputs["main"] = model(
                torch.cat([latents, condition], dim=1),
                case.input("main.input.t"),
                case.input("main.input.context")[None],
                encoder_hidden_states_image=case.input("main.input.clip_fea"),
                audio_embeds=case.input("main.input.audio"),
            ).sample
    return outputs


def test_golden_case_through_converter(golden_case: GoldenCase, tmp_path):
    original = golden_case.write_original_folder(tmp_path / "original")
    convert_transformer(original, tmp_path / "converted", golden_case.variant)
    dtype = torch.bfloat16 if golden_case.bf16 else torch.float32
    model = SkyReelsV3Transformer3DModel.from_pretrained(tmp_path / "converted", torch_dtype=dtype).eval()

    outputs = run_case(golden_case, model)
    assert set(outputs) == {k.split(".")[0] for k in golden_case.meta["outputs"]}
    for subcase, out in outputs.items():
        ref = golden_case.tensors[f"{subcase}.output.out"]
        assert out.shape == ref.shape
        assert out.dtype == dtype
        assert torch.isfinite(out).all()
        if not golden_case.bf16:
            assert rel_l2(out, ref) <= 1e-5, subcase
        else:
            fp32_ref = load_file(str(FIXTURES / golden_case.name.replace("bf16", "fp32") / "tensors.safetensors"))
            ours = rel_l2(out, fp32_ref[f"{subcase}.output.out"])
            original = golden_case.meta["bf16_vs_fp32"][f"{subcase}.output.out"]["rel_l2"]
            assert ours <= 1.5 * original, (subcase, ours, original)


@pytest.mark.parametrize("name", ["extension_fp32", "avatar_fp32"])
def test_golden_intermediates_fp32(name, tmp_path):
    """Embedding intermediates match the original module by module (fp32)."""
    case = GoldenCase(name)
    convert_transformer(case.write_original_folder(tmp_path / "o"), tmp_path / "c", case.variant)
    model = SkyReelsV3Transformer3DModel.from_pretrained(tmp_path / "c").eval()
    sub = "tensor" if case.variant == "extension" else "main"
    t = case.input(f"{sub}.input.t")
    context = case.input(f"{sub}.input.context")
    if context.ndim == 2:
        context = context[None]
    with torch.no_grad():
        temb, proj, text, _ = model.condition_embedder(t, context)
    torch.testing.assert_close(temb.flatten(0, 1), case.tensors[f"{sub}.inter.time_embedding"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        proj.flatten(0, 1).flatten(1), case.tensors[f"{sub}.inter.time_projection"], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(text, case.tensors[f"{sub}.inter.text_embedding"], atol=1e-5, rtol=1e-5)
    if case.variant == "avatar":
        with torch.no_grad():
            audio = model.audio_proj(case.input("main.input.audio"))
        torch.testing.assert_close(audio, case.tensors["main.inter.audio_proj"], atol=1e-5, rtol=1e-5)


def test_semantic_bugs_are_caught(tmp_path):
    """The fp32 gate can fail: contiguous RoPE for the shot-switching condition instead of the 1024 offset, and one
    timestep for all frames instead of per-frame timesteps, both break parity by orders of magnitude."""
    case = GoldenCase("extension_fp32")
    convert_transformer(case.write_original_folder(tmp_path / "o"), tmp_path / "c", "extension")
    model = SkyReelsV3Transformer3DModel.from_pretrained(tmp_path / "c").eval()
    x_main, x_ctx = case.input("list.input.x_main"), case.input("list.input.x_ctx0")
    t, context = case.input("list.input.t"), case.input("list.input.context")
    with torch.no_grad():
        model.rope.condition_offset = x_main.shape[2]  # contiguous positions
        model.rope._cache.clear()
        wrong_rope = model(x_main, t, context, condition_hidden_states=x_ctx).sample
        model.rope.condition_offset = 1024
        model.rope._cache.clear()
        wrong_t = model(x_main, t[:, :1], context, condition_hidden_states=x_ctx).sample
    ref = case.tensors["list.output.out"]
    assert rel_l2(wrong_rope, ref) > 1e-2
    assert rel_l2(wrong_t, ref) > 1e-2
