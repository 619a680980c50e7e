"""The avatar's per-frame audio attention on a rank's slice of the tokens (context parallelism) gives, bit for bit,
the rows of the whole sequence's output: a slice that starts or ends inside a frame is cut into runs (the end of a
frame, whole frames, the start of a frame), each attending to its own frames' audio tokens as one process does."""

import pytest
import torch

from skyreels_diffusers.models.attention_processor import (
    SkyReelsV3AudioAttention,
    SkyReelsV3AudioAttnProcessor,
    frame_runs,
)


class SliceProcessor(SkyReelsV3AudioAttnProcessor):
    """The processor as on a rank whose first token is `offset` (what the device mesh would say)."""

    def __init__(self, offset: int):
        self.offset = offset
        self._parallel_config = object()

    def _shard_offset(self, seq_len: int, total: int) -> int:
        return self.offset


@pytest.mark.parametrize(
    "offset, seq_len, runs",
    [
        (0, 40, [(0, 40, 0, 4)]),  # the whole sequence: one batched call, as before
        (5, 30, [(0, 5, 0, 1), (5, 25, 1, 3), (25, 30, 3, 4)]),  # the end of a frame, two frames, the start of one
        (10, 20, [(0, 20, 1, 3)]),  # aligned: whole frames only
        (12, 5, [(0, 5, 1, 2)]),  # inside one frame
        (7, 13, [(0, 3, 0, 1), (3, 13, 1, 2)]),
    ],
)
def test_frame_runs(offset, seq_len, runs):
    assert frame_runs(offset, seq_len, 10) == runs
    covered = [i for start, end, _, _ in runs for i in range(start, end)]
    assert covered == list(range(seq_len))  # every token once, in order
    for start, end, first, last in runs:  # each run: part of one frame or whole frames, and those frames' audio
        assert (offset + start) // 10 == first and (offset + end - 1) // 10 == last - 1
        assert last - first == 1 or (end - start) == 10 * (last - first)


def test_a_slice_of_the_tokens_gives_the_whole_outputs_rows():
    """In float32 (the parallel tests' dtype; in bf16 the CPU's GEMMs already round a slice's projections otherwise
    than the whole's). The masked attention over every touched frame that this replaced was 1e-7 off here."""
    dtype = torch.float32
    torch.manual_seed(0)
    frames, tokens_per_frame, audio_tokens = 5, 12, 6
    attn = SkyReelsV3AudioAttention(dim=32, audio_dim=24, heads=2, dim_head=16).to(dtype)
    hidden = torch.randn(2, frames * tokens_per_frame, 32, dtype=dtype)
    audio = torch.randn(2, frames, audio_tokens, 24, dtype=dtype)
    with torch.no_grad():
        whole = attn(hidden, audio, tokens_per_frame=tokens_per_frame)
        assert whole.shape == hidden.shape and whole.dtype == dtype
        for offset, seq_len in [(0, 30), (30, 30), (7, 29), (36, 24), (13, 5), (0, 60 - 1)]:
            attn.set_processor(SliceProcessor(offset))
            part = attn(hidden[:, offset : offset + seq_len], audio, tokens_per_frame=tokens_per_frame)
            assert torch.equal(part, whole[:, offset : offset + seq_len]), (offset, seq_len)
        attn.set_processor(SkyReelsV3AudioAttnProcessor())
