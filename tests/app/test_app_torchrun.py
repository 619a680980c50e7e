"""`torchrun --nproc_per_node 2 -m skyreels_diffusers.cli app --ulysses-degree 2` on CPUs (gloo): rank 0 serves the
page, both ranks compute each job (sharded), rank 0 alone writes, and the page shows the torchrun command.
(That sharded results equal one process is tested in tests/parallel.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="the web app extra (gradio) is not installed")

ROOT = Path(__file__).resolve().parents[2]


def test_app_under_torchrun_generates(tmp_path):
    from gradio_client import Client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        master = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(master), "-m", "skyreels_diffusers.cli", "app", "--model", "tiny", "--port", str(port),
         "--ulysses-degree", "2", "--output-dir", str(tmp_path / "results")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(240):
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                assert process.poll() is None, process.stdout.read().decode()[-3000:]
                time.sleep(0.5)
        client = Client(url, verbose=False)
        # shot switching without uploads uses the built-in example clip (tiny model)
        result = client.predict(None, "a cut", "default", 2, 42, 2, api_name="/generate_shot_switching_extension")
        video, download, command = result[:3]
        assert command.startswith("torchrun --nproc_per_node 2 -m skyreels_diffusers.cli generate")
        written = list((tmp_path / "results" / "shot_switching_extension").glob("*.mp4"))
        assert len(written) == 1  # rank 0 alone writes
    finally:
        process.terminate()
        output = process.communicate(timeout=60)[0].decode()
    assert output.count("tiny RANDOM weights") == 2  # both ranks loaded the pipeline and computed
