"""The per-step network bytes of `bench/parallel_traffic.py` (what docs/parallel.md tabulates for the real models)
against the bytes the collectives actually move: one forward of the tiny transformer under 2 gloo processes, every
collective counted in PyTorch's dispatcher (`tests/parallel/traffic_worker.py`)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import torchrun_command
from tests.test_bench_scripts import load_bench_script


ROOT = Path(__file__).resolve().parents[2]
ALL_TO_ALL = "_c10d_functional.all_to_all_single.default"
RING_GATHER = "_c10d_functional.all_gather_into_tensor.default"
LIST_GATHER = "c10d.allgather_.default"  # the _cp_plan's output gather (and a few 16-byte shape exchanges)
FSDP_GATHER = "c10d._allgather_base_.default"


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    out = tmp_path_factory.mktemp("traffic")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    command = torchrun_command("-m", "tests.parallel.traffic_worker", str(out))
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"traffic_{rank}.json").read_text()) for rank in (0, 1)]


def predicted(ulysses: int, ring: int, shard_weights: bool) -> dict:
    """`parallel_traffic.traffic` for the tiny model and the worker's 72 tokens (float32 activations)."""
    from skyreels_diffusers.models.configs import TINY_TRANSFORMER_CONFIGS
    from skyreels_diffusers.parallel.sharding import sharding_plan
    from tests.helpers import tiny_transformer
    from tests.parallel.traffic_worker import FRAMES, HEIGHT, WIDTH

    traffic = load_bench_script("parallel_traffic.py")
    config = TINY_TRANSFORMER_CONFIGS["reference"]
    plan = sharding_plan(tiny_transformer("reference"), 1)
    model = traffic.Model(
        config["num_layers"],
        config["num_attention_heads"],
        config["attention_head_dim"],
        plan["total_bytes"],
        plan["whole_bytes"],
    )
    tokens = FRAMES * (HEIGHT // 2) * (WIDTH // 2)
    return traffic.traffic(model, tokens, ulysses, ring, 1, shard_weights, value_bytes=4, output_channels=64)


@pytest.mark.slow
def test_ulysses_bytes_are_the_predicted_ones(counted):
    expected = predicted(2, 1, False)
    for rank in counted:
        seen = rank["ulysses"]
        assert seen["calls"][ALL_TO_ALL] == 2 * 4  # q, k, v, out in each of the 2 layers
        assert seen["bytes"][ALL_TO_ALL] / 2 == expected["ulysses_bytes"]  # each rank keeps 1/2 of what it sends
        # the output gather (the list holds both ranks' parts; the peer's half arrives) + 16-byte shape exchanges
        assert 0 <= seen["bytes"][LIST_GATHER] / 2 - expected["output_gather_bytes"] <= 16 * seen["calls"][LIST_GATHER]


@pytest.mark.slow
def test_ring_bytes_are_the_predicted_ones(counted):
    expected = predicted(1, 2, False)
    for rank in counted:
        seen = rank["ring"]
        assert seen["calls"][RING_GATHER] == 2  # k and v together, once per layer
        assert seen["bytes"][RING_GATHER] == expected["ring_bytes"]  # the peer's k and v arrive (R - 1 = 1)
        assert ALL_TO_ALL not in seen["calls"]


@pytest.mark.slow
def test_weight_sharding_bytes_are_the_predicted_ones(counted):
    expected = predicted(2, 1, True)["fsdp_bytes"]  # the FSDP part depends on the number of ranks only
    for rank in counted:
        seen = rank["fsdp"]
        assert seen["calls"][FSDP_GATHER] == 2 + 1  # every block, then the root
        received = seen["bytes"][FSDP_GATHER] / 2  # the gathered buffers; half is the peer's shard
        assert expected <= received <= expected * 1.02  # FSDP pads each shard to equal rows
