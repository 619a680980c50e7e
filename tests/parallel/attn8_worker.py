"""Worker of the 8-bit-backend context-parallel test: a tiny transformer with 64-channel heads (the kernel's
smallest) and the `triton_8bit` backend, in Triton's CPU interpreter, in one process or sharded over 2 gloo
processes with Ulysses (each rank's kernel then sees the whole sequence of its one head). Rank 0 (or the single
process) writes its output to `<dir>/attn8_<single|0>.pt`."""

from __future__ import annotations

import os
import sys


os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def main(out_dir: str) -> None:
    from skyreels_diffusers.models import SkyReelsV3Transformer3DModel
    from skyreels_diffusers.models.configs import TINY_TRANSFORMER_CONFIGS
    from skyreels_diffusers.parallel import enable_context_parallel

    parallel = "WORLD_SIZE" in os.environ
    if parallel:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    cfg = {**TINY_TRANSFORMER_CONFIGS["reference"], "attention_head_dim": 64, "num_layers": 1}
    model = SkyReelsV3Transformer3DModel(**cfg).to(torch.bfloat16).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, cfg["in_channels"], 5, 8, 12, generator=g).bfloat16(),
        encoder_hidden_states=torch.randn(1, 16, cfg["text_dim"], generator=g).bfloat16(),
        timestep=torch.tensor([937]),
    )
    model.set_attention_backend("triton_8bit")
    if parallel:
        enable_context_parallel(model, ulysses_degree=2)
    with torch.no_grad():
        out = model(**inputs).sample
    rank = dist.get_rank() if parallel else "single"
    if rank in ("single", 0):
        torch.save(out, os.path.join(out_dir, f"attn8_{rank}.pt"))
    if parallel:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
