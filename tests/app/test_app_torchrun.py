"""`torchrun --nproc_per_node 2 -m skyreels_diffusers.app.cli app --ulysses-degree 2` on CPUs (gloo): rank 0 serves the
page, both ranks compute each job (sharded), rank 0 alone writes, and the page shows the torchrun command.
(That sharded results equal one process is tested in tests/parallel.)"""

from __future__ import annotations

import pytest


pytest.importorskip("gradio", reason="the web app extra (gradio) is not installed")


@pytest.mark.slow
def test_app_under_torchrun_generates(tmp_path):
    from gradio_client import Client

    from tests.app.server import start_app

    process, url = start_app(tmp_path, nproc=2)
    try:
        client = Client(url, verbose=False)
        # shot switching without uploads uses the built-in example clip (tiny model)
        result = client.predict(None, "a cut", "default", 2, 42, 2, api_name="/generate_shot_switching_extension")
        video, download, command = result[:3]
        assert command.startswith("torchrun --nproc_per_node 2 -m skyreels_diffusers.app.cli generate")
        written = list((tmp_path / "results" / "shot_switching_extension").glob("*.mp4"))
        assert len(written) == 1  # rank 0 alone writes
    finally:
        process.terminate()
        output = process.communicate(timeout=60)[0].decode()
    assert output.count("tiny RANDOM weights") == 2  # both ranks loaded the pipeline and computed
