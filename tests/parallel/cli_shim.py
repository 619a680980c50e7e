"""`skyreels-v3 generate` for the multi-node tests, with two test-only switches in front of the CLI's own arguments:

    python -m tests.parallel.cli_shim [--cpu-ring] [--tiled-vae] [--placement DIR] generate --task ... (the CLI's)

* `--cpu-ring` registers `cpu_flash_lse`, an attention backend for CPUs that returns the log-sum-exp ring attention
  merges partial results with (PyTorch's CPU flash kernel), and passes `--attention-backend cpu_flash_lse`:
  diffusers' CPU backend (`native`, SDPA) returns none, so `--ring-degree` cannot run on gloo otherwise.
* `--tiled-vae` (one process) runs the same request through `app.run.run` with the VAE tiled exactly as the
  parallel VAE tiles it (diffusers' default tiles): the one-process video a multi-process run must equal.
* `--placement DIR` writes `DIR/<global rank>.txt` holding the node (torchrun's `GROUP_RANK`) the rank runs on.
"""

from __future__ import annotations

import sys

import torch


CPU_LSE_BACKEND = "cpu_flash_lse"


def register_cpu_lse_backend() -> None:
    """Register `cpu_flash_lse` with diffusers' attention registry (context parallel, Ulysses and ring)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry, _templated_context_parallel_attention

    from skyreels_diffusers.models.attention_8bit_backend import _add_backend_name

    name = _add_backend_name(CPU_LSE_BACKEND)
    if name in _AttentionBackendRegistry._backends:
        return

    def forward_op(
        ctx,
        query,
        key,
        value,
        attn_mask=None,
        dropout_p=0.0,
        is_causal=False,
        scale=None,
        enable_gqa=False,
        return_lse=False,
        _save_ctx=True,
        _parallel_config=None,
    ):
        """`(B, S, H, D)` in, `(B, S, H, D)` out and, with `return_lse`, the log-sum-exp `(B, S, H)`."""
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            dropout_p,
            is_causal,
            attn_mask=attn_mask,
            scale=scale,
        )[:2]
        out = out.transpose(1, 2).contiguous()
        return (out, lse.transpose(1, 2).contiguous()) if return_lse else out

    def backward_op(ctx, grad_out, *args, **kwargs):
        raise NotImplementedError(f"{CPU_LSE_BACKEND} is inference-only")

    @_AttentionBackendRegistry.register(name, supports_context_parallel=True)
    def attention(
        query,
        key,
        value,
        attn_mask=None,
        dropout_p=0.0,
        is_causal=False,
        scale=None,
        enable_gqa=False,
        return_lse=False,
        _parallel_config=None,
    ):
        if _parallel_config is None:
            return forward_op(None, query, key, value, attn_mask, dropout_p, is_causal, scale, return_lse=return_lse)
        return _templated_context_parallel_attention(
            query,
            key,
            value,
            attn_mask,
            dropout_p,
            is_causal,
            scale,
            enable_gqa,
            return_lse,
            forward_op=forward_op,
            backward_op=backward_op,
            _parallel_config=_parallel_config,
        )


def run_tiled(argv: list[str]) -> int:
    """One process: the CLI's request through `app.run.run` with the tiny pipeline's VAE tiled."""
    from skyreels_diffusers.app.cli import build_parser, generation_request
    from skyreels_diffusers.app.run import run
    from skyreels_diffusers.app.tiny import tiny_pipeline

    request = generation_request(build_parser().parse_args(argv))
    pipe = tiny_pipeline(request.task, seed=0)  # what `--model tiny` loads
    pipe.vae.enable_tiling()
    print(run(request, pipe=pipe))
    return 0


def main(argv: list[str]) -> int:
    import os
    from pathlib import Path

    from skyreels_diffusers.app.cli import main as cli_main

    if "--placement" in argv:
        at = argv.index("--placement")
        folder, argv = Path(argv[at + 1]), argv[:at] + argv[at + 2 :]
        (folder / f"{os.environ['RANK']}.txt").write_text(os.environ["GROUP_RANK"])
    if "--cpu-ring" in argv:
        argv = [a for a in argv if a != "--cpu-ring"] + ["--attention-backend", CPU_LSE_BACKEND]
        register_cpu_lse_backend()
    if "--tiled-vae" in argv:
        return run_tiled([a for a in argv if a != "--tiled-vae"])
    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
