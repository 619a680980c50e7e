"""A prompt longer than the text encoder reads is cut with a warning giving its token count (before: silently)."""

from __future__ import annotations

import logging

import pytest

from skyreels_diffusers.app.tiny import tiny_pipeline


LOGGER = "skyreels_diffusers.pipelines.common"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("reference_to_video")


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def test_a_long_prompt_warns_with_its_token_count(pipe, caplog):
    # the tiny tokenizer is byte-level: one token per character, plus the end-of-sequence token
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        pipe.encode_prompt("a" * 40, device="cpu", max_sequence_length=16)
    assert _warnings(caplog) == ["prompt is 41 tokens; the text encoder reads the first 16 (the rest is ignored)"]


def test_the_negative_prompt_is_named_and_short_prompts_are_quiet(pipe, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        pipe.encode_prompt("a cat", "b" * 20, True, device="cpu", max_sequence_length=16)
        pipe.encode_prompt("c" * 15, device="cpu", max_sequence_length=16)  # 16 tokens: exactly what is read
        pipe.encode_prompt(["short", "d" * 30], device="cpu", max_sequence_length=16)
    assert _warnings(caplog) == [
        "negative prompt is 21 tokens; the text encoder reads the first 16 (the rest is ignored)",
        "prompt is 31 tokens; the text encoder reads the first 16 (the rest is ignored)",
    ]


def test_the_default_length_is_512_tokens(pipe, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        pipe.encode_prompt("e" * 730, device="cpu")
        pipe.encode_prompt("f" * 511, device="cpu")
    assert _warnings(caplog) == ["prompt is 731 tokens; the text encoder reads the first 512 (the rest is ignored)"]
