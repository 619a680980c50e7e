"""Start `skyreels-v3 app` in a subprocess on a free loopback port (optionally under torchrun) for the tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.helpers import free_port, torchrun_command


ROOT = Path(__file__).resolve().parents[2]


def start_app(folder: Path, nproc: int = 1) -> tuple[subprocess.Popen, str]:
    """Launch the tiny app writing under `folder/results`; returns the process and its URL once it answers."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    command = [
        "-m",
        "skyreels_diffusers.app.cli",
        "app",
        "--model",
        "tiny",
        "--port",
        str(port),
        "--output-dir",
        str(folder / "results"),
    ]
    command = [sys.executable, *command]
    if nproc > 1:
        command = torchrun_command(*command[1:], "--ulysses-degree", str(nproc), nproc=nproc)
    process = subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(240):
        try:
            urllib.request.urlopen(url, timeout=1)
            return process, url
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(process.stdout.read().decode()[-3000:]) from None
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("the app did not start")
