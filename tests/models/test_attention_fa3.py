"""FlashAttention-3 backends (`fa3`, `fa3_fp8`) on CPU: which FA3 is found and when it is chosen, the message when it
is missing (before any model loads), the FP8 input preparation against exact attention, the routing of calls FA3 does
not take, and the log-sum-exp ring attention needs. FA3 itself is replaced by a PyTorch stand-in with its calling
convention (`fa3_stub/`: exact attention on the dequantised inputs); the tests on the real kernel need a Hopper GPU
with FA3 installed and skip elsewhere."""

from __future__ import annotations

import importlib.machinery
import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

from skyreels_diffusers.models import attention_backends as backends


STUB = Path(__file__).parent / "fa3_stub"


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def exact(q, k, v, scale=None):
    out = torch.nn.functional.scaled_dot_product_attention(
        *(x.float().transpose(1, 2) for x in (q, k, v)), scale=scale
    )
    return out.transpose(1, 2)


def make_qkv(tokens=96, heads=2, dim=64, kv_tokens=None, outlier=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, tokens, heads, dim, generator=g)
    k, v = (torch.randn(1, kv_tokens or tokens, heads, dim, generator=g) for _ in range(2))
    if outlier:  # K-channel bias and outliers, a V mean (bench_attention.py's outlier inputs)
        k += 2.0 * torch.randn(1, 1, heads, dim, generator=g)
        v += torch.randn(1, 1, heads, dim, generator=g)
        channels = torch.randperm(dim, generator=g)[:4]
        for x in (q, k):
            x[..., channels] = 3.0 + 5.0 * x[..., channels]
    return tuple(x.bfloat16() for x in (q, k, v))


@pytest.fixture(autouse=True)
def restore_active_backend():
    """`set_attention_backend` also sets diffusers' process-wide active backend: put it back after each test."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(active)


@pytest.fixture
def no_fa3(monkeypatch):
    """No FA3 package and no `kernels` (a `None` in sys.modules makes an import fail)."""
    for name in (*backends.FA3_PACKAGES, "kernels"):
        monkeypatch.setitem(sys.modules, name, None)
    backends.reset_fa3_discovery()
    yield
    backends.reset_fa3_discovery()


@pytest.fixture
def stub_fa3(no_fa3, monkeypatch):
    """The stand-in installed as the `fa3-fwd` wheel's module."""
    monkeypatch.syspath_prepend(str(STUB))
    monkeypatch.delitem(sys.modules, "fa3_fwd_interface")
    backends.reset_fa3_discovery()
    stub = __import__("fa3_fwd_interface")
    assert Path(stub.__file__).parent == STUB
    stub.CALLS.clear()
    return stub


@pytest.fixture
def hopper(monkeypatch):
    """Pretend to be on an H100 (only the capability queries; nothing runs on a GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


def test_missing_fa3_names_every_way_to_install_it(no_fa3):
    assert backends.fa3_provider() is None and backends.default_attention_backend() is None
    for name in ("fa3", "fa3_fp8", AttentionBackendName("fa3")):
        with pytest.raises(ImportError, match="needs FlashAttention-3") as error:
            backends.check_attention_backend_available(name)
        for way in ("skyreels-diffusers[fa3]", "fa3-fwd", "hopper/", "flash_attn_interface", "pip install kernels"):
            assert way in str(error.value)
        assert not backends.attention_backend_available(name)
    backends.check_attention_backend_available("native")  # diffusers' own backends are diffusers' to check


def test_missing_fa3_is_refused_before_the_model_loads(no_fa3, monkeypatch, capsys):
    from skyreels_diffusers.app import run as run_module
    from skyreels_diffusers.app.cli import main

    monkeypatch.setattr(run_module, "load_pipeline", lambda request: pytest.fail("model loaded before validation"))
    command = ["generate", "--task", "reference_to_video", "--model", "tiny", "--attention-backend", "fa3"]
    assert main(command) == 2
    assert (
        "--attention-backend: attention backend 'fa3' needs FlashAttention-3: pip install" in capsys.readouterr().err
    )


def test_provider_order_and_a_broken_build(no_fa3, monkeypatch, tmp_path):
    assert backends.fa3_provider() is None
    # the `kernels` package: diffusers' Hub FA3, only when a download is allowed
    kernels = types.ModuleType("kernels")
    kernels.__spec__ = importlib.machinery.ModuleSpec("kernels", None)
    monkeypatch.setitem(sys.modules, "kernels", kernels)
    assert backends.fa3_provider() == "hub" and backends.fa3_provider(hub=False) is None
    # an FA3 build that does not load here (another torch): skipped, and its error is reported
    (tmp_path / "flash_attn_interface.py").write_text("raise OSError('undefined symbol: _ZN3c10')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn_interface")
    monkeypatch.delitem(sys.modules, "kernels")
    monkeypatch.setitem(sys.modules, "kernels", None)
    backends.reset_fa3_discovery()
    assert backends.fa3_provider() is None
    with pytest.raises(ImportError, match="flash_attn_interface: OSError: undefined symbol"):
        backends.check_attention_backend_available("fa3")
    # the wheel's module after a working FA3 build's: the build comes first
    monkeypatch.syspath_prepend(str(STUB))
    monkeypatch.delitem(sys.modules, "fa3_fwd_interface")
    backends.reset_fa3_discovery()
    assert backends.fa3_provider() == "fa3_fwd_interface"
    monkeypatch.setitem(sys.modules, "flash_attn_interface", __import__("fa3_fwd_interface"))
    backends.reset_fa3_discovery()
    assert backends.fa3_provider() == "flash_attn_interface"


def test_fa3_is_the_default_on_hopper_only(stub_fa3, monkeypatch):
    assert backends.default_attention_backend("cpu") is None
    if not torch.cuda.is_available():
        assert backends.default_attention_backend() is None  # no GPU: SDPA's choice
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            backends.check_attention_backend_available("fa3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, expected in (((9, 0), "fa3"), ((8, 0), None), ((8, 9), None), ((10, 0), None)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert backends.default_attention_backend("cuda") == expected, capability
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    backends.check_attention_backend_available("fa3")  # asked for by name, FA3 runs on Ampere too
    with pytest.raises(RuntimeError, match="FP8 kernels \\(Hopper"):
        backends.check_attention_backend_available("fa3_fp8")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    backends.check_attention_backend_available("fa3_fp8")


def test_default_never_downloads(no_fa3, hopper, monkeypatch):
    kernels = types.ModuleType("kernels")
    kernels.__spec__ = importlib.machinery.ModuleSpec("kernels", None)
    monkeypatch.setitem(sys.modules, "kernels", kernels)
    assert backends.fa3_provider() == "hub"
    assert backends.default_attention_backend("cuda") is None
    assert not backends.attention_backend_available("fa3")  # the --fast choice does not download either


def test_enable_fast_path_sets_fa3_by_default_on_hopper(stub_fa3, monkeypatch):
    from skyreels_diffusers.optimization import enable_fast_path
    from tests.helpers import tiny_transformer

    class Holder:
        transformer = tiny_transformer("reference")

    enable_fast_path(Holder)  # on a CPU: diffusers' default stays
    assert Holder.transformer.blocks[0].attn1.processor._attention_backend is None
    monkeypatch.setattr(backends, "default_attention_backend", lambda device: "fa3")
    enable_fast_path(Holder)
    assert Holder.transformer.blocks[0].attn1.processor._attention_backend == AttentionBackendName("fa3")
    Holder.transformer.reset_attention_backend()


def test_fa3_backend_runs_what_fa3_takes_and_hands_on_the_rest(stub_fa3):
    q, k, v = make_qkv()
    out = dispatch_attention_fn(q, k, v, backend="fa3")
    assert out.dtype == torch.bfloat16 and out.shape == q.shape and len(stub_fa3.CALLS) == 1
    assert rel(out, exact(q, k, v)) < 5e-3  # the stand-in is exact: bf16 rounding of the output only
    # cross-attention: fewer keys than queries
    _, ck, cv = make_qkv(kv_tokens=20, seed=1)
    assert rel(dispatch_attention_fn(q, ck, cv, backend="fa3"), exact(q, ck, cv)) < 5e-3
    assert stub_fa3.CALLS[-1]["k"] == (1, 20, 2, 64)
    # with log-sum-exp (what ring attention merges by), in diffusers' (B, L, H) layout
    out, lse = dispatch_attention_fn(q, k, v, backend="fa3", attention_kwargs={"return_lse": True})
    scores = torch.einsum("bqhd,bkhd->bqhk", q.float(), k.float()) / math.sqrt(64)
    torch.testing.assert_close(lse, scores.logsumexp(-1), rtol=0, atol=1e-4)
    # a mask, float32 or dropout go to diffusers' native backend, bit for bit, without calling FA3
    calls = len(stub_fa3.CALLS)
    mask = torch.rand(1, 1, 96, 96, generator=torch.Generator().manual_seed(0)) > 0.2
    native = dispatch_attention_fn(q, k, v, attn_mask=mask, backend="native")
    assert torch.equal(dispatch_attention_fn(q, k, v, attn_mask=mask, backend="fa3"), native)
    q32, k32, v32 = (x.float() for x in (q, k, v))
    assert torch.equal(
        dispatch_attention_fn(q32, k32, v32, backend="fa3"), dispatch_attention_fn(q32, k32, v32, backend="native")
    )
    assert len(stub_fa3.CALLS) == calls


def test_cross_attention_of_lossy_backends_is_exact():
    assert backends.cross_attention_backend("fa3_fp8") == AttentionBackendName("fa3")
    assert backends.cross_attention_backend(AttentionBackendName("fa3_fp8")) == AttentionBackendName("fa3")
    assert backends.cross_attention_backend("fa3") == "fa3"
    assert backends.cross_attention_backend("triton_8bit") == AttentionBackendName.NATIVE
    assert backends.cross_attention_backend(None) is None


def test_fp8_preparation(stub_fa3):
    """What FA3's FP8 kernel is given: e4m3 tensors with one descale per (batch, head) whose largest magnitude is
    448; K without its mean; Q and K rotated (the scores unchanged up to FP8 rounding); V centred."""
    q, k, v = make_qkv(tokens=128, outlier=True)
    pre = backends.quantize_fp8_inputs(q, k, v, with_lse=True)
    for name in "qkv":
        assert pre[name].dtype == torch.float8_e4m3fn and pre[name].shape == q.shape
        assert pre[f"{name}_descale"].shape == (1, 2) and pre[f"{name}_descale"].dtype == torch.float32
        assert pre[name].float().abs().amax(dim=(1, 3)).eq(448).all()
    q8, k8, v8 = (pre[n].float() * pre[f"{n}_descale"][:, None, :, None] for n in "qkv")
    assert k8.mean(dim=1).abs().max() < 0.05 * k8.abs().max()  # smoothed (rotation keeps a zero mean zero)
    scores = torch.einsum("bqhd,bkhd->bhqk", q8, k8) * pre["softmax_scale"] + pre["lse_shift"][..., None]
    reference = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(64)
    assert rel(scores, reference) < 0.02  # plus the per-query shift, the same scores
    assert rel(v8 + pre["v_mean"].float(), v) < 0.05
    naive = backends.quantize_fp8_inputs(q, k, v, scaled=False, smooth_k=False, rotate_qk=False, smooth_v=False)
    assert naive["q_descale"] is None and torch.equal(naive["q"], q.to(torch.float8_e4m3fn))


def test_fa3_fp8_accuracy_and_what_the_preparation_buys(stub_fa3):
    """Through the stand-in (exact attention on the FP8 inputs, so the error is the inputs' rounding): on inputs with
    a K bias and outlier channels, the prepared inputs are several times closer to exact attention than the plain
    cast; the op returns the input dtype and the log-sum-exp of the unsmoothed scores."""
    q, k, v = make_qkv(tokens=256, outlier=True, seed=3)
    reference = exact(q, k, v)
    prepared, lse = backends.fa3_fp8_attention(q, k, v, with_lse=True)
    plain, _ = backends.fa3_fp8_attention(q, k, v, scaled=False, smooth_k=False, rotate_qk=False, smooth_v=False)
    assert prepared.dtype == torch.bfloat16 and prepared.shape == q.shape
    assert rel(prepared, reference) < 0.05 and rel(prepared, reference) < rel(plain, reference) / 2.5  # ~3.6%, ~12%
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(64)
    error = (lse - scores.logsumexp(-1)).abs()  # FP8 rounding of scores up to ~60: 0.1 on average, not the K mean's
    assert error.mean() < 0.2 and error.max() < 1.0  # shift (13 on average here)
    assert backends.fa3_fp8_attention(q, k, v)[1].numel() == 0  # without with_lse: nothing that could be misused
    assert all(call["dtype"] == torch.float8_e4m3fn for call in stub_fa3.CALLS)


def test_fa3_fp8_preparation_is_compiled_and_only_the_kernel_is_opaque(stub_fa3):
    """Under `torch.compile` the FP8 preparation (means, rotation, per-head maxima, scaling, casts) is part of the
    traced graph, where Inductor fuses its passes over Q, K and V; the one opaque op is FA3's FP8 kernel. The compiled
    call is as close to exact attention as the eager one, output and log-sum-exp."""
    graphs = []

    def inductor(graph, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        graphs.append(graph.code)
        return compile_fx(graph, example_inputs)

    q, k, v = make_qkv(tokens=128, outlier=True, seed=5)
    eager_out, eager_lse = backends.fa3_fp8_attention(q, k, v, with_lse=True)
    compiled = torch.compile(backends.fa3_fp8_attention, backend=inductor, fullgraph=True)
    out, lse = compiled(q, k, v, with_lse=True)
    (code,) = graphs
    assert code.count("torch.ops.skyreels.fa3_fp8_kernel.default(") == 1 and "fa3_fp8_attention" not in code
    for step in (".mean(", ".amax(", ".amin(", " @ h", "float8_e4m3fn"):  # K / V means, maxima, rotation, casts
        assert step in code, step
    # Inductor keeps the preparation's intermediates in float32 where eager rounds each to bf16, so some values round
    # to the neighbouring FP8 level: the compiled output differs from the eager one by about the FP8 error itself
    # (2.8%), and is as close to exact attention (3.7% against eager's 3.6%)
    reference = exact(q, k, v)
    assert out.dtype == eager_out.dtype == torch.bfloat16
    assert rel(out, reference) < 0.05 and rel(out, reference) < 1.25 * rel(eager_out, reference)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(64)
    for error in ((x - scores.logsumexp(-1)).abs() for x in (lse, eager_lse)):
        assert error.mean() < 0.2 and error.max() < 1.0


def test_fa3_fp8_chunks_merge_like_ring_attention(stub_fa3):
    """Ring attention runs the backend on one key/value chunk at a time and merges the partial outputs by their
    log-sum-exp (diffusers' formula). Each chunk has its own K mean: without the log-sum-exp correction the merge is
    wrong; with it the merged output matches exact attention as closely as the whole call does."""
    q, k, v = make_qkv(tokens=128, outlier=True, seed=4)
    k[:, 64:] += 3.0  # a different K mean in the second chunk
    reference = exact(q, k, v)
    parts = [
        dispatch_attention_fn(q, k[:, s], v[:, s], backend="fa3_fp8", attention_kwargs={"return_lse": True})
        for s in (slice(0, 64), slice(64, 128))
    ]
    (out0, lse0), (out1, lse1) = ((o.float(), lse.unsqueeze(-1)) for o, lse in parts)
    merged = out0 - torch.sigmoid(lse1 - lse0) * (out0 - out1)
    whole = dispatch_attention_fn(q, k, v, backend="fa3_fp8")
    assert rel(merged, reference) < 0.05 and rel(whole, reference) < 0.05  # 3.1% and 3.3%
    # the same chunks merged by the uncorrected log-sum-exp (FA3's own, of the smoothed scores) are far off
    shift = [
        backends.quantize_fp8_inputs(q, k[:, s], v[:, s], with_lse=True)["lse_shift"]
        for s in (slice(0, 64), slice(64, 128))
    ]
    raw0, raw1 = (lse - sh.permute(0, 2, 1).unsqueeze(-1) for lse, sh in zip((lse0, lse1), shift))
    wrong = out0 - torch.sigmoid(raw1 - raw0) * (out0 - out1)
    assert rel(wrong, reference) > 5 * rel(merged, reference)


@pytest.mark.slow
def test_transformer_on_fa3_eager_and_compiled(stub_fa3):
    """A tiny transformer through `set_attention_backend`: `fa3` equals the native path up to bf16 rounding,
    `fa3_fp8` stays close, and both compile with `fullgraph=True` (FA3 is one custom op with a fake)."""
    from skyreels_diffusers.models import SkyReelsV3Transformer3DModel
    from skyreels_diffusers.models.configs import TINY_TRANSFORMER_CONFIGS

    torch.manual_seed(0)
    cfg = {**TINY_TRANSFORMER_CONFIGS["reference"], "num_layers": 1}
    model = SkyReelsV3Transformer3DModel(**cfg).to(torch.bfloat16).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, cfg["in_channels"], 5, 8, 12, generator=g).bfloat16(),
        encoder_hidden_states=torch.randn(1, 16, cfg["text_dim"], generator=g).bfloat16(),
        timestep=torch.tensor([937]),
    )
    outputs = {}
    with torch.no_grad():
        for backend in ("native", "fa3", "fa3_fp8"):
            model.set_attention_backend(backend)
            outputs[backend] = model(**inputs).sample.float()
        calls = {(c["q"][1], c["k"][1], c["dtype"]) for c in stub_fa3.CALLS}
        stub_fa3.CALLS.clear()
        model.compile_repeated_blocks(fullgraph=True)  # fa3_fp8: its self-attention op and (cross) fa3's op
        compiled = model(**inputs).sample.float()
    model.reset_attention_backend()
    # self-attention (5 x 4 x 6 tokens) on FA3 in bf16 and in FP8, the text cross-attention on exact FA3 for both
    assert calls == {(120, 120, torch.bfloat16), (120, 120, torch.float8_e4m3fn), (120, 16, torch.bfloat16)}
    assert {(c["q"][1], c["k"][1], c["dtype"]) for c in stub_fa3.CALLS} == calls - {(120, 120, torch.bfloat16)}
    assert rel(outputs["fa3"], outputs["native"]) < 1e-2
    assert 0 < rel(outputs["fa3_fp8"], outputs["native"]) < 0.1
    assert rel(compiled, outputs["fa3_fp8"]) < 1e-2


@pytest.mark.slow
def test_context_parallel_ulysses_and_ring_on_fa3(tmp_path):
    """Two gloo processes: Ulysses and ring attention (which merges chunks by FA3's log-sum-exp; `fa3_fp8` corrects
    it for each chunk's K mean) give the one-process output: `fa3` to bf16 rounding, `fa3_fp8` to FP8 rounding
    (each ring chunk has its own scales)."""
    import json
    import subprocess

    from tests.helpers import torchrun_command

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root}", "OMP_NUM_THREADS": "1"}
    command = torchrun_command("-m", "tests.models.fa3_cp_worker", str(tmp_path))
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    diff = json.loads((tmp_path / "fa3_cp.json").read_text())
    assert diff["fa3_ulysses"] < 1e-2 and diff["fa3_ring"] < 1e-2, diff
    assert diff["fa3_fp8_ulysses"] < 1e-2, diff  # Ulysses: each rank sees whole sequences, the same quantisation
    assert diff["fa3_fp8_ring"] < 0.02, diff  # 0.3% with the stand-in


def test_fast_preset_takes_the_first_backend_that_runs(stub_fa3, hopper, monkeypatch):
    from skyreels_diffusers import optimization

    monkeypatch.setattr(optimization, "FAST_ATTENTION_BACKENDS", ("fa3_fp8", "triton_8bit"))
    assert optimization.fast_preset() == {"attention_backend": "fa3_fp8", "quantize": "fp8_dynamic", "compile": True}
    monkeypatch.setitem(sys.modules, "fa3_fwd_interface", None)  # FA3 gone: the Triton kernel (interpreter here)
    backends.reset_fa3_discovery()
    assert optimization.fast_preset()["attention_backend"] == "triton_8bit"
    monkeypatch.setattr(optimization, "FAST_ATTENTION_BACKENDS", ("fa3_fp8",))  # none runs: the first, whose check
    assert optimization.fast_preset()["attention_backend"] == "fa3_fp8"  # then says what is missing


# ------------------------------------------------------------------------------------ the real kernel (Hopper)

needs_fa3 = pytest.mark.skipif(
    not torch.cuda.is_available() or backends.default_attention_backend("cuda") is None,
    reason="needs a Hopper GPU with FlashAttention-3 installed (flash_attn_interface or fa3-fwd)",
)


@needs_fa3
def test_gpu_fa3_matches_sdpa_and_fp8_is_bounded():
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 4096, 8, 128, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    reference = exact(q, k, v)
    assert rel(dispatch_attention_fn(q, k, v, backend="fa3"), reference) < 5e-3
    assert rel(dispatch_attention_fn(q, k, v, backend="fa3_fp8"), reference) < 0.08  # FP8 Q·K and P·V: ~5.5%
    out, lse = dispatch_attention_fn(q, k, v, backend="fa3_fp8", attention_kwargs={"return_lse": True})
    _, exact_lse = dispatch_attention_fn(q, k, v, backend="fa3", attention_kwargs={"return_lse": True})
    assert (lse - exact_lse).abs().max() < 0.2


@needs_fa3
def test_gpu_golden_parity_on_fa3(golden_case, tmp_path):
    """The goldens' bf16 criterion holds with FA3 as the attention kernel (fp32 cases go to SDPA: FA3 has no fp32)."""
    if not golden_case.bf16:
        pytest.skip("FA3 has no float32 kernel: fp32 runs on SDPA")
    from safetensors.torch import load_file

    from skyreels_diffusers.app.convert import convert_transformer
    from skyreels_diffusers.models import SkyReelsV3Transformer3DModel
    from tests.helpers import FIXTURES
    from tests.models.test_golden_parity import rel_l2, run_case

    original = golden_case.write_original_folder(tmp_path / "original")
    convert_transformer(original, tmp_path / "converted", golden_case.variant)
    model = SkyReelsV3Transformer3DModel.from_pretrained(tmp_path / "converted", torch_dtype=torch.bfloat16)
    model = model.eval().cuda()
    model.set_attention_backend("fa3")
    golden_case.tensors = {name: t.cuda() for name, t in golden_case.tensors.items()}
    outputs = run_case(golden_case, model)
    fp32_ref = load_file(str(FIXTURES / golden_case.name.replace("bf16", "fp32") / "tensors.safetensors"))
    for subcase, out in outputs.items():
        ours = rel_l2(out.cpu(), fp32_ref[f"{subcase}.output.out"])
        original_error = golden_case.meta["bf16_vs_fp32"][f"{subcase}.output.out"]["rel_l2"]
        print(f"{golden_case.name} {subcase}: fa3 {ours:.5f}, the original's bf16 {original_error:.5f}")
        assert ours <= 1.5 * original_error, (subcase, ours, original_error)
