"""Model behaviour in diffusers' manner: round trips, determinism, shapes, backends, offload, casting, strictness."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from skyreels_diffusers.models import SkyReelsV3Transformer3DModel
from skyreels_diffusers.models.configs import TINY_TRANSFORMER_CONFIGS, TRANSFORMER_CONFIGS
from tests.helpers import tiny_inputs, tiny_transformer


VARIANTS = list(TINY_TRANSFORMER_CONFIGS)


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


@pytest.mark.parametrize("variant", VARIANTS)
def test_output_shape_and_dtype(variant):
    model = tiny_transformer(variant)
    inputs = tiny_inputs(model, variant, frames=3, height=8, width=12)
    out = forward(model, inputs)
    assert out.shape == (1, model.config.out_channels, 3, 8, 12)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_deterministic(variant):
    model = tiny_transformer(variant)
    inputs = tiny_inputs(model, variant)
    torch.testing.assert_close(forward(model, inputs), forward(model, inputs), atol=0, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_load_round_trip(variant, tmp_path):
    model = tiny_transformer(variant)
    inputs = tiny_inputs(model, variant)
    model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    assert len(list((tmp_path / "m").glob("*.safetensors"))) > 1  # sharded
    loaded = SkyReelsV3Transformer3DModel.from_pretrained(tmp_path / "m").eval()

    def strip(c):
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in c.items() if not k.startswith("_")}

    assert strip(loaded.config) == strip(model.config)
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    # same weights; memory layout of loaded tensors may change the summation order of CPU kernels by an ulp
    torch.testing.assert_close(forward(loaded, inputs), forward(model, inputs), atol=1e-6, rtol=1e-5)


def test_bf16_load_keeps_fp32_modules(tmp_path):
    tiny_transformer("avatar").save_pretrained(tmp_path / "m")
    model = SkyReelsV3Transformer3DModel.from_pretrained(tmp_path / "m", torch_dtype=torch.bfloat16)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes["condition_embedder.time_embedder.linear_1.weight"] == torch.float32
    assert dtypes["condition_embedder.time_proj.weight"] == torch.float32
    assert dtypes["blocks.0.scale_shift_table"] == torch.float32
    assert dtypes["blocks.0.norm2.weight"] == torch.float32
    assert dtypes["blocks.0.norm_audio.weight"] == torch.float32
    assert dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    inputs = tiny_inputs(model, "avatar")
    assert forward(model, inputs).dtype == torch.bfloat16


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_strict_loading_names_the_keys(change, tmp_path):
    tiny_transformer("extension").save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    if change == "missing":
        del state["blocks.1.attn2.to_k.bias"]
        name = "blocks.1.attn2.to_k.bias"
    else:
        state["blocks.0.attn1.to_qq.weight"] = torch.zeros(2)
        name = "blocks.0.attn1.to_qq.weight"
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=rf"{change} keys: .*{name.replace('.', '[.]')}"):
        SkyReelsV3Transformer3DModel.from_pretrained(tmp_path / "m")


def test_uniform_per_frame_timestep_equals_scalar_timestep():
    model = tiny_transformer("extension")
    inputs = tiny_inputs(model, "extension", frames=3)
    per_frame = forward(model, {**inputs, "timestep": torch.tensor([[500, 500, 500]])})
    scalar = forward(model, {**inputs, "timestep": torch.tensor([500])})
    torch.testing.assert_close(per_frame, scalar, atol=1e-6, rtol=1e-5)
    mixed = forward(model, {**inputs, "timestep": torch.tensor([[0, 500, 500]])})
    assert (mixed - scalar).abs().max() > 1e-3


def test_condition_tokens_are_appended_and_dropped():
    model = tiny_transformer("extension")
    inputs = tiny_inputs(model, "extension", frames=3)
    condition = torch.randn(1, 16, 2, 8, 12)
    timestep = torch.tensor([[930, 930, 930, 0, 0]])
    out = forward(model, {**inputs, "timestep": timestep, "condition_hidden_states": condition})
    assert out.shape == inputs["hidden_states"].shape
    as_list = forward(model, {**inputs, "timestep": timestep, "condition_hidden_states": [condition]})
    torch.testing.assert_close(out, as_list, atol=0, rtol=0)
    without = forward(model, {**inputs, "timestep": timestep[:, :3]})
    assert (out - without).abs().max() > 1e-4  # the condition is attended to


def test_rope_condition_positions_start_at_offset():
    model = tiny_transformer("extension")
    cos, sin = model.rope(2, 2, 3, [2], device="cpu")
    assert cos.shape == (1, 4 * 2 * 3, 1, model.config.attention_head_dim)
    t_dim = model.rope.axis_dims[0]
    # the first temporal channel pair rotates with frequency 1: angle == temporal position
    angles = torch.atan2(sin[0, :, 0, 1], cos[0, :, 0, 0]).view(4, 6)[:, 0].double()
    expected = torch.tensor([0.0, 1.0, 1024.0, 1025.0], dtype=torch.float64)
    torch.testing.assert_close(
        torch.remainder(angles - expected + torch.pi, 2 * torch.pi) - torch.pi,
        torch.zeros(4, dtype=torch.float64),
        atol=1e-6,
        rtol=0,
    )
    assert t_dim == 16 - 4 * (16 // 6)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"timestep": torch.tensor([[1, 2]])}, "timestep"),
        ({"condition_hidden_states": torch.randn(1, 16, 2, 4, 12)}, "condition_hidden_states"),
        ({"hidden_states": torch.randn(1, 16, 3, 7, 12)}, "multiples of the patch size"),
    ],
)
def test_bad_inputs_raise(bad, message):
    model = tiny_transformer("extension")
    inputs = {**tiny_inputs(model, "extension"), **bad}
    with pytest.raises(ValueError, match=message):
        forward(model, inputs)


def test_avatar_requires_matching_audio():
    model = tiny_transformer("avatar")
    inputs = tiny_inputs(model, "avatar", frames=3)
    with pytest.raises(ValueError, match="audio_embeds"):
        forward(model, {**inputs, "audio_embeds": None})
    with pytest.raises(ValueError, match="audio_embeds"):
        forward(model, {**inputs, "audio_embeds": inputs["audio_embeds"][:, :5]})


def test_audio_attention_is_per_frame():
    """Audio of latent frame 2 only reaches the tokens of latent frame 2 in the audio attention."""
    model = tiny_transformer("avatar", num_layers=1)
    block = model.blocks[0]
    tokens = torch.randn(1, 3 * 4, model.config.attention_head_dim * 2)
    audio = torch.randn(1, 3, 4, model.config.audio_dim)
    changed = audio.clone()
    changed[:, 2] += 1.0
    with torch.no_grad():
        a, b = block.attn_audio(tokens, audio), block.attn_audio(tokens, changed)
    diff = (a - b).abs().amax(-1).view(3, 4)
    assert diff[:2].max() == 0 and diff[2].min() > 0


def test_set_attention_backend():
    model = tiny_transformer("avatar")
    inputs = tiny_inputs(model, "avatar")
    reference = forward(model, inputs)
    model.set_attention_backend("native")
    processors = [m.processor for m in model.modules() if hasattr(m, "processor")]
    assert len(processors) == 3 * model.config.num_layers
    assert all(str(p._attention_backend) in ("native", "AttentionBackendName.NATIVE") for p in processors)
    torch.testing.assert_close(forward(model, inputs), reference, atol=0, rtol=0)
    model.set_attention_backend("_native_math")
    torch.testing.assert_close(forward(model, inputs), reference, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        model.set_attention_backend("no-such-backend")
    model.reset_attention_backend()


@pytest.mark.parametrize("variant", VARIANTS)
def test_group_offload_matches(variant):
    model = tiny_transformer(variant)
    inputs = tiny_inputs(model, variant)
    reference = forward(model, inputs)
    model.enable_group_offload(torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
    torch.testing.assert_close(forward(model, inputs), reference, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_layerwise_casting_close(variant):
    model = tiny_transformer(variant)
    inputs = tiny_inputs(model, variant)
    reference = forward(model, inputs)
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    assert model.patch_embedding.weight.dtype == torch.float32  # skipped pattern
    out = forward(model, inputs)
    rel = ((out - reference).norm() / reference.norm()).item()
    assert 0 < rel < 0.1


def test_gradient_checkpointing_same_output_and_grads():
    model = tiny_transformer("extension")
    inputs = tiny_inputs(model, "extension")
    out = model(**inputs).sample
    out.square().mean().backward()
    grad = model.blocks[0].attn1.to_q.weight.grad.clone()
    model.zero_grad()
    model.enable_gradient_checkpointing()
    out2 = model(**inputs).sample
    out2.square().mean().backward()
    torch.testing.assert_close(out2, out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model.blocks[0].attn1.to_q.weight.grad, grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant, billions", [("reference", 14.3), ("extension", 14.3), ("avatar", 18.9)])
def test_real_size_parameter_count(variant, billions):
    with torch.device("meta"):
        model = SkyReelsV3Transformer3DModel(**TRANSFORMER_CONFIGS[variant])
    count = sum(p.numel() for p in model.parameters()) / 1e9
    assert abs(count - billions) < 0.1, count


def test_declared_integration_attributes():
    cls = SkyReelsV3Transformer3DModel
    assert cls._no_split_modules == ["SkyReelsV3TransformerBlock"] == cls._repeated_blocks
    assert {"rope", "blocks.0", "proj_out"} <= set(cls._cp_plan)
    model = tiny_transformer("extension")
    model.compile_repeated_blocks  # noqa: B018 - exists (CacheMixin/ModelMixin API)
    assert json.loads(model.to_json_string())["_class_name"] == "SkyReelsV3Transformer3DModel"


@pytest.mark.parametrize("variant", ["reference", "avatar"])
def test_fused_projections_match_and_are_used(variant):
    """`fuse_qkv_projections()` (diffusers' AttentionMixin) fuses self-attention q/k/v and every cross-attention k/v
    (text, CLIP, audio) into one linear each; the output is unchanged, and poisoning the unfused k/v weights shows the
    fused ones are the ones used."""
    model = tiny_transformer(variant, seed=3)
    inputs = tiny_inputs(model, variant, seed=1)
    with torch.no_grad():
        expected = model(**inputs).sample
    model.fuse_qkv_projections()
    fused = [name for name, module in model.named_modules() if getattr(module, "fused_projections", False)]
    assert len(fused) == len(model.blocks) * (3 if variant == "avatar" else 2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if (
                any(f".{part}." in name for part in ("to_k", "to_v", "add_k_proj", "add_v_proj"))
                or ".attn1.to_q." in name
            ):
                param.fill_(float("nan"))
        torch.testing.assert_close(model(**inputs).sample, expected, rtol=1e-6, atol=1e-6)
