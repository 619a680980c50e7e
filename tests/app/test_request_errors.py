"""Typed errors: the library names the argument in a field, the request maps it to its flag through one table, and
the CLI and the web app read the fields (before: `ValueError` strings the request re-parsed with regular
expressions, and the web app split the text at its first colon)."""

from __future__ import annotations

import pickle

import pytest

from skyreels_diffusers.app.request import RequestError, as_input_error, flag_of, flagged
from skyreels_diffusers.app.web import error_field
from skyreels_diffusers.errors import InputError
from skyreels_diffusers.pipelines.errors import PipelineInputError


def test_library_errors_carry_the_argument_and_read_as_before():
    error = PipelineInputError("num_inference_steps", "must be an integer in [1, 100], got 0.")
    assert isinstance(error, InputError) and isinstance(error, ValueError)
    assert (error.argument, error.message) == ("num_inference_steps", "must be an integer in [1, 100], got 0.")
    assert str(error) == "`num_inference_steps` must be an integer in [1, 100], got 0."
    assert str(InputError("input_audio", "file not found: a.wav")) == "`input_audio`: file not found: a.wav"


@pytest.mark.parametrize(
    "error, flag, text",
    [
        (PipelineInputError("num_inference_steps", "must be >= 1."), "--steps", "--steps: must be >= 1."),
        (PipelineInputError("video", "is required."), "--input-video", "--input-video: is required."),
        (PipelineInputError("num_frames", "must be 4k+1."), "--duration", "--duration: must be 4k+1."),
        (PipelineInputError("fps", "must be a multiple of 4."), "--keep-source-fps", None),
        (InputError("resume_dir", "x is a file"), "--resume-dir", "--resume-dir: x is a file"),
        (  # mentions of other arguments become their flags too
            InputError("input_audio", "4.0 s is over 1 s (raise `max_audio_seconds` to allow longer audio)."),
            "--input-audio",
            "--input-audio: 4.0 s is over 1 s (raise --max-audio-seconds to allow longer audio).",
        ),
    ],
)
def test_the_request_maps_arguments_to_flags(error, flag, text):
    mapped = flagged(error)
    assert isinstance(mapped, RequestError) and mapped.flag == flag == flag_of(error.argument)
    if text is not None:
        assert str(mapped) == text
    assert flagged(mapped) is mapped


def test_request_errors_cross_processes():
    """Under torchrun rank 0 validates and broadcasts the error (pickled) to the other ranks."""
    error = RequestError("max_audio_seconds", "must be positive")
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.argument, copy.flag, str(copy)) == (
        RequestError,
        "max_audio_seconds",
        "--max-audio-seconds",
        "--max-audio-seconds: must be positive",
    )
    library = pickle.loads(pickle.dumps(PipelineInputError("height", "must be a multiple of 16.")))
    assert (type(library), library.argument, str(library)) == (
        PipelineInputError,
        "height",
        "`height` must be a multiple of 16.",
    )


def test_untyped_library_errors_are_read_until_they_raise_input_error():
    assert as_input_error(ValueError("`resume_dir`: /x is a file; give a folder")).argument == "resume_dir"
    assert as_input_error(ValueError("`resize_mode` must be one of (...), got 'x'.")).message.startswith("must")
    assert as_input_error(ValueError("frames must be a non-empty [F, H, W, 3] array")) is None
    assert as_input_error(ValueError("`weird name`: text")) is None


@pytest.mark.parametrize(
    "error, field",
    [
        (RequestError("ref_imgs", "x"), "ref_imgs"),
        (RequestError("height", "x"), "resolution"),
        (RequestError("width", "x"), "resolution"),  # before: shown under the form ("--width" was not mapped)
        (RequestError("crf", "x"), "general"),
        (ValueError("--steps: looks like a flag but is untyped"), "general"),
    ],
)
def test_the_web_app_places_errors_by_their_field(error, field):
    assert error_field(error) == field
