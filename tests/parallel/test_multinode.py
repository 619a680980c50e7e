"""Multi-node runs started as a new user starts them: two `torchrun --nnodes 2 --rdzv_backend c10d
--rdzv_endpoint 127.0.0.1:PORT` launches on one host (two "nodes", gloo on CPU, the tiny model, `skyreels-v3
generate`'s own arguments), everything on 127.0.0.1 and every launch bounded in time.

* 2 nodes x 1 process, `--ulysses-degree 2`: Ulysses across the nodes (the CLI itself);
* 2 nodes x 2 processes, `--ulysses-degree 2 --ring-degree 2`: Ulysses inside a node, ring across the nodes
  (torchrun gives each node consecutive ranks and diffusers' mesh is (ring, ulysses), Ulysses innermost); through
  `tests.parallel.cli_shim --cpu-ring`, which only registers a CPU attention backend returning the log-sum-exp ring
  attention needs (diffusers' CPU backend returns none).

"The one-process video up to the tile seams", made exact: every multi-node video equals the one-process video whose
VAE decodes with the same tiles (`cli_shim --tiled-vae`; the parallel VAE always tiles, 256-px tiles at a 192-px
stride), to float rounding (uint8 frames equal, ring attention's merged softmax flipping at most a few values by a
level or two). Against the default one-process run (VAE untiled) the difference is exactly the tiling's: the same
array as one-process tiled minus untiled, nothing from the nodes. The Wan VAE decodes each tile by itself (its
mid-block attention and border convolutions see the tile, not the frame), so that difference is not confined to the
64-px blend bands: with these random weights it covers the whole frame.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import free_port


ROOT = Path(__file__).resolve().parents[2]
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
    "OMP_NUM_THREADS": "1",
    "GLOO_SOCKET_IFNAME": "lo",  # gloo's sockets on the loopback interface only
}
# 64 x 320 px: two VAE tiles side by side (under 2 x 2 processes two ranks decode none); 4 x 20 = 80 tokens per
# latent frame (divisible by 4 ranks)
ARGS = [
    "generate",
    "--task",
    "reference_to_video",
    "--model",
    "tiny",
    "--steps",
    "1",
    "--duration",
    "1",
    "--height",
    "64",
    "--width",
    "320",
    "--crf",
    "0",
]
TIMEOUT_S = 300


def one_process(module: list[str], output: Path, *extra: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", *module, *ARGS, *extra, "--output", str(output)],
        cwd=output.parent,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def two_nodes(module: list[str], output: Path, processes_per_node: int, *extra: str) -> list[str]:
    """Two torchrun launches joining one c10d rendezvous on 127.0.0.1 (as on two machines, with the first's address
    as the endpoint); returns their stdouts. Both are killed if either outlives the timeout."""
    endpoint = f"127.0.0.1:{free_port()}"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc_per_node",
        str(processes_per_node),
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        endpoint,
        "--rdzv_id",
        uuid.uuid4().hex[:8],
        "--local_addr",
        "127.0.0.1",
        "--max_restarts",
        "0",
        "-m",
        *module,
        *ARGS,
        *extra,
        "--output",
        str(output),
    ]
    nodes = [
        subprocess.Popen(
            command, cwd=output.parent, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = []
    try:
        for node in nodes:
            out, err = node.communicate(timeout=TIMEOUT_S)
            assert node.returncode == 0, err[-3000:]
            outputs.append(out)
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    return outputs


def frames(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.int16)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process videos: the CLI's default (VAE untiled) and the same request with the parallel VAE's tiles."""
    folder = tmp_path_factory.mktemp("multinode")
    one_process(["skyreels_diffusers.app.cli"], folder / "untiled.mp4")
    one_process(["tests.parallel.cli_shim", "--tiled-vae"], folder / "tiled.mp4")
    untiled, tiled = frames(folder / "untiled.mp4"), frames(folder / "tiled.mp4")
    assert untiled.shape == tiled.shape == (25, 64, 320, 3)
    return folder, untiled, tiled


def check_up_to_the_tiles(video: np.ndarray, untiled: np.ndarray, tiled: np.ndarray, flips: int) -> None:
    """`video` is the one-process tiled video to float rounding (at most `flips` values off, by <= 2 levels), and
    differs from the untiled one by the tiles' own difference."""
    assert video.shape == tiled.shape
    off = np.abs(video - tiled)
    assert off.max() <= 2 and np.count_nonzero(off) <= flips, (off.max(), np.count_nonzero(off))
    tiling = tiled - untiled  # what the tiles change on one process
    assert np.count_nonzero(tiling) > 0.05 * tiling.size  # not a seam-only difference, with these random weights
    assert np.abs((video - untiled) - tiling).max() <= 2
    assert np.count_nonzero((video - untiled) != tiling) <= flips


@pytest.mark.slow
def test_ulysses_across_two_nodes_gives_the_one_process_video(single):
    folder, untiled, tiled = single
    outputs = two_nodes(["skyreels_diffusers.app.cli"], folder / "ulysses.mp4", 1, "--ulysses-degree", "2")
    assert sum(out.count("ulysses.mp4") for out in outputs) == 1  # written and printed once, by global rank 0
    check_up_to_the_tiles(frames(folder / "ulysses.mp4"), untiled, tiled, flips=0)


@pytest.mark.slow
def test_ulysses_inside_nodes_and_ring_across_gives_the_one_process_video(single):
    from diffusers import ContextParallelConfig

    folder, untiled, tiled = single
    placement = folder / "placement"
    placement.mkdir()
    two_nodes(
        ["tests.parallel.cli_shim", "--cpu-ring", "--placement", str(placement)],
        folder / "ring.mp4",
        2,
        "--ulysses-degree",
        "2",
        "--ring-degree",
        "2",
    )
    # global ranks 0, 1 on one node and 2, 3 on the other; the mesh's innermost dimension is Ulysses, so the
    # Ulysses groups {0, 1} and {2, 3} stay inside a node and the ring pairs {0, 2}, {1, 3} cross them
    nodes = {int(p.stem): int(p.read_text()) for p in placement.glob("*.txt")}
    assert sorted(nodes) == [0, 1, 2, 3] and nodes[0] == nodes[1] != nodes[2] == nodes[3]
    assert ContextParallelConfig(ring_degree=2, ulysses_degree=2).mesh_dim_names == ("ring", "ulysses")
    check_up_to_the_tiles(frames(folder / "ring.mp4"), untiled, tiled, flips=int(1e-3 * tiled.size))
