"""`skyreels-v3 generate --model FOLDER --transformer FILE`: a GGUF / single-file transformer replaces the folder's."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers.quantizers.gguf.utils import GGUFLinear
from safetensors.torch import save_file

from skyreels_diffusers.app.cli import main
from skyreels_diffusers.app.request import GenerationRequest, validate
from skyreels_diffusers.app.run import load_pipeline
from skyreels_diffusers.app.tiny import tiny_pipeline
from skyreels_diffusers.pipelines.video_io import write_video
from tests.conversion.community_files import T, wan_native_state, write_community_gguf
from tests.helpers import random_video


TASK = "single_shot_extension"


@pytest.fixture
def folder_and_files(tmp_path):
    pipe = tiny_pipeline(TASK, seed=0)
    folder = tmp_path / "model"
    pipe.save_pretrained(folder)
    torch.manual_seed(7)  # a transformer that differs from the folder's
    for p in pipe.transformer.parameters():
        p.data.normal_(0, 0.05)
    wan = wan_native_state(pipe.transformer)
    decoded = write_community_gguf(tmp_path / "t-Q8_0.gguf", wan, T.Q8_0)
    save_file({k: v.contiguous() for k, v in wan.items()}, str(tmp_path / "t.safetensors"))
    video = write_video(random_video(frames=30, height=64, width=96), tmp_path / "in.mp4", fps=24)
    return {
        "folder": folder,
        "gguf": tmp_path / "t-Q8_0.gguf",
        "single": tmp_path / "t.safetensors",
        "decoded": decoded,
        "wan": wan,
        "video": str(video),
    }


def _request(files, transformer, **extra) -> GenerationRequest:
    return GenerationRequest(
        task=TASK,
        model=str(files["folder"]),
        transformer=str(transformer),
        input_video=files["video"],
        duration=1,
        steps=1,
        height=32,
        width=48,
        device="cpu",
        **extra,
    )


def test_gguf_transformer_replaces_the_folders(folder_and_files):
    pipe = load_pipeline(validate(_request(folder_and_files, folder_and_files["gguf"])))
    linears = [m for m in pipe.transformer.modules() if isinstance(m, GGUFLinear)]
    assert linears and all(m.weight.quant_type == T.Q8_0 for m in linears)
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    weight = dequantize_gguf_tensor(pipe.transformer.blocks[0].attn1.to_q.weight).float()
    torch.testing.assert_close(
        weight, folder_and_files["decoded"]["blocks.0.self_attn.q.weight"], rtol=1e-3, atol=1e-3
    )  # dequantised in fp16 (GGUF scales are fp16)


def test_single_file_transformer_replaces_the_folders(folder_and_files):
    pipe = load_pipeline(validate(_request(folder_and_files, folder_and_files["single"])))
    expected = folder_and_files["wan"]["blocks.0.self_attn.q.weight"].to(torch.bfloat16)
    assert torch.equal(pipe.transformer.blocks[0].attn1.to_q.weight, expected)


@pytest.mark.slow
def test_gguf_transformer_generates_through_the_cli(folder_and_files, tmp_path):
    out = tmp_path / "o.mp4"
    code = main(
        [
            "generate",
            "--task",
            TASK,
            "--model",
            str(folder_and_files["folder"]),
            "--transformer",
            str(folder_and_files["gguf"]),
            "--input-video",
            folder_and_files["video"],
            "--duration",
            "1",
            "--steps",
            "1",
            "--height",
            "32",
            "--width",
            "48",
            "--device",
            "cpu",
            "--output",
            str(out),
        ]
    )
    assert code == 0 and out.stat().st_size > 0


@pytest.mark.parametrize(
    "change, argument",
    [
        ({"model": "tiny"}, "--transformer"),
        ({"transformer": "nowhere.gguf"}, "--transformer"),
        ({"transformer": "weights.txt"}, "--transformer"),
        ({"quantize": "fp8_weight_only"}, "--quantize"),
    ],
)
def test_bad_transformer_arguments_fail_before_loading(folder_and_files, tmp_path, change, argument):
    request = _request(folder_and_files, folder_and_files["gguf"])
    if change.get("transformer") == "weights.txt":
        (tmp_path / "weights.txt").write_text("x")
        change = {"transformer": str(tmp_path / "weights.txt")}
    request = dataclasses.replace(request, **change)  # the request is frozen
    with pytest.raises(ValueError, match=argument):
        validate(request)
