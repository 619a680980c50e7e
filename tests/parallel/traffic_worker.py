"""Worker of the network-traffic test: under torchrun (2 gloo processes) one forward of the tiny transformer per
layout, every collective counted on its way through PyTorch's dispatcher (name, calls, bytes of its input);
writes `traffic_<rank>.json`. Layouts: Ulysses 2; ring 2 (with the CPU log-sum-exp backend of `cli_shim`); weights
sharded (FSDP2) without context parallelism."""

from __future__ import annotations

import collections
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode


FRAMES, HEIGHT, WIDTH = 3, 8, 12  # 3 x 4 x 6 = 72 tokens


def nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    return 0


class Collectives(TorchDispatchMode):
    """Calls and input bytes of every c10d / functional-collective op (the waits excepted)."""

    def __init__(self):
        super().__init__()
        self.calls, self.bytes = collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "c10d" in name and "wait_tensor" not in name and "_wrap_tensor" not in name:
            self.calls[name] += 1
            self.bytes[name] += nbytes(args[0]) if args else 0
        return func(*args, **(kwargs or {}))


def forward(layout: str) -> dict:
    from skyreels_diffusers.parallel import enable_context_parallel
    from skyreels_diffusers.parallel.sharding import shard_transformer
    from tests.helpers import tiny_inputs, tiny_transformer
    from tests.parallel.cli_shim import CPU_LSE_BACKEND, register_cpu_lse_backend

    model = tiny_transformer("reference", seed=7)
    inputs = tiny_inputs(model, "reference", frames=FRAMES, height=HEIGHT, width=WIDTH, seed=1)
    if layout == "ulysses":
        enable_context_parallel(model, ulysses_degree=2)
    elif layout == "ring":
        register_cpu_lse_backend()
        model.set_attention_backend(CPU_LSE_BACKEND)
        enable_context_parallel(model, ring_degree=2)
    else:
        shard_transformer(model, torch.device("cpu"), prefetch=False)
    with torch.no_grad(), Collectives() as seen:
        model(**inputs)
    return {"calls": dict(seen.calls), "bytes": dict(seen.bytes)}


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    result = {layout: forward(layout) for layout in ("ulysses", "ring", "fsdp")}
    with open(os.path.join(out_dir, f"traffic_{dist.get_rank()}.json"), "w") as out:
        json.dump(result, out, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
