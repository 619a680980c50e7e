"""Worker of the FA3 context-parallel test: a tiny transformer with the `fa3` and `fa3_fp8` backends (FA3 replaced by
the PyTorch stand-in in `fa3_stub/`), sharded over 2 gloo processes with Ulysses and with ring attention. Every rank
also runs the unsharded model; rank 0 writes the relative differences to `<dir>/fa3_cp.json`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent / "fa3_stub"))  # FA3's calling convention, exact, on CPU

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def main(out_dir: str) -> None:
    from skyreels_diffusers.models import SkyReelsV3Transformer3DModel
    from skyreels_diffusers.models.attention_backends import fa3_provider
    from skyreels_diffusers.models.configs import TINY_TRANSFORMER_CONFIGS
    from skyreels_diffusers.parallel import enable_context_parallel

    assert fa3_provider() == "fa3_fwd_interface"
    dist.init_process_group("gloo")
    cfg = {**TINY_TRANSFORMER_CONFIGS["reference"], "num_layers": 1}
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, cfg["in_channels"], 5, 8, 12, generator=g).bfloat16(),
        encoder_hidden_states=torch.randn(1, 16, cfg["text_dim"], generator=g).bfloat16(),
        timestep=torch.tensor([937]),
    )

    def model():
        torch.manual_seed(0)
        return SkyReelsV3Transformer3DModel(**cfg).to(torch.bfloat16).eval().requires_grad_(False)

    result = {}
    with torch.no_grad():
        for backend in ("fa3", "fa3_fp8"):
            single = model()
            single.set_attention_backend(backend)
            reference = single(**inputs).sample.float()
            for name, degrees in (("ulysses", dict(ulysses_degree=2)), ("ring", dict(ring_degree=2))):
                sharded = model()
                sharded.set_attention_backend(backend)
                enable_context_parallel(sharded, **degrees)
                out = sharded(**inputs).sample.float()
                result[f"{backend}_{name}"] = ((out - reference).norm() / reference.norm()).item()
    if dist.get_rank() == 0:
        Path(out_dir, "fa3_cp.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1])
