"""Bounded-memory tensor reading and shard writing of the converter (`conversion.tensor_io`)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from skyreels_diffusers.loaders.tensor_io import PlannedTensor, TensorSource, write_safetensors_shards


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(10, generator=g)
    return {
        "bf16": torch.randn(3, 4, generator=g).bfloat16(),
        "int": torch.arange(6).reshape(2, 3),
        "strided": torch.randn(4, 6, generator=g)[:, ::2],  # a non-contiguous view
        "base": base,
        "offset_view": base[2:5],  # shares `base`'s storage at an offset
        "scalar": torch.tensor(1.5),
    }


@pytest.mark.parametrize("nested", [False, True])
def test_pth_tensors_read_one_at_a_time_equal_torch_load(nested, tmp_path):
    state = _state()
    torch.save({"state_dict": state} if nested else state, tmp_path / "w.pth")
    source = TensorSource(tmp_path / "w.pth")
    assert source.keys() == sorted(state)
    for key, tensor in state.items():
        got = source.get(key)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), key
        assert source.info(key).shape == tuple(tensor.shape)


def test_pth_with_a_foreign_global_is_refused(tmp_path):
    torch.save({"w": torch.zeros(2), "x": torch.nn.ReLU()}, tmp_path / "w.pth")
    with pytest.raises(Exception, match="not allowed"):
        TensorSource(tmp_path / "w.pth")


def test_safetensors_header_only_and_truncation_named(tmp_path):
    state = {k: v.clone().contiguous() for k, v in _state().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    source = TensorSource(tmp_path)
    for key, tensor in state.items():
        assert torch.equal(source.get(key), tensor), key
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[:-16])
    with pytest.raises(ValueError, match=r"w\.safetensors is truncated"):
        TensorSource(tmp_path / "w.safetensors")


def test_streamed_shards_hold_every_tensor_once_within_the_size(tmp_path):
    state = {k: v.clone().contiguous() for k, v in _state().items()}
    planned = [
        PlannedTensor(k, tuple(v.shape), torch.float32 if v.is_floating_point() else v.dtype, lambda v=v: v)
        for k, v in state.items()
    ]
    write_safetensors_shards(tmp_path, planned, "model", max_shard_size=64)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    seen = {}
    for shard in shards:
        with safe_open(str(tmp_path / shard), framework="pt") as handle:
            names = handle.keys()  # a safe_open handle, not a dict
            for key in names:
                assert key not in seen
                seen[key] = handle.get_tensor(key)
    assert seen.keys() == state.keys()
    for key, tensor in state.items():
        expected = tensor.float() if tensor.is_floating_point() else tensor
        assert seen[key].dtype == expected.dtype and torch.equal(seen[key], expected), key
