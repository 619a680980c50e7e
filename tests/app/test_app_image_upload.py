"""An image upload Gradio cannot open (a decompression bomb, a file that is not an image) reaches the request's own
checks: the visitor reads what is wrong under the portrait input, and the upload copy is deleted."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest


pytest.importorskip("gradio", reason="the web app extra (gradio) is not installed")

from gradio.data_classes import ImageData

from skyreels_diffusers.app.web import JobRunner, build_app
from tests.helpers import random_image


@pytest.fixture
def uploads(tmp_path, monkeypatch):
    folder = tmp_path / "gradio"
    folder.mkdir()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(folder))
    return folder


def _upload(uploads: Path, name: str, write) -> Path:
    path = uploads / name.replace(".", "_") / name
    path.parent.mkdir()
    write(path)
    return path


def _speech(path: Path) -> None:
    import soundfile

    t = np.arange(16000) / 16000
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)


@pytest.fixture
def avatar_tab(tmp_path):
    demo = build_app(model="tiny", output_dir=str(tmp_path / "out"), runner=JobRunner())
    portrait = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "talking_avatar-input-image")
    handler = next(fn.fn for fn in demo.fns.values() if fn.api_name == "generate_talking_avatar")
    return portrait, handler


def _generate(handler, portrait_path, audio_path):
    """The avatar tab's inputs in order: portrait, audio, prompt, resolution, duration, seed, steps; progress."""
    visitor = SimpleNamespace(session_hash="visitor")
    path, _, _, *errors = handler(visitor, portrait_path, audio_path, "a person talks", "default", 0, 1, 1, None)
    return path, [e for e in errors if e]


@pytest.mark.slow
def test_a_decompression_bomb_portrait_gets_a_clear_message(tmp_path, uploads, avatar_tab):
    """Before: Gradio's Image.preprocess raised DecompressionBombError before any handler ran; the page showed
    "Error" and the upload copy stayed."""
    portrait, handler = avatar_tab
    bomb = _upload(uploads, "bomb.png", lambda p: PIL.Image.new("1", (14000, 14000)).save(p))  # 196 Mpixel
    audio = _upload(uploads, "speech.wav", _speech)
    value = portrait.preprocess(ImageData(path=str(bomb), orig_name="bomb.png"))  # what Gradio does first
    assert value == str(bomb)
    path, errors = _generate(handler, value, str(audio))
    assert path is None and len(errors) == 1
    assert errors[0].startswith("**Error:** --input-image: bomb.png has more pixels than the limit of 89478485")
    assert str(uploads) not in errors[0]
    assert not bomb.exists() and not audio.exists()  # the upload copies are deleted


def test_a_text_file_as_portrait_gets_a_clear_message(tmp_path, uploads, avatar_tab):
    portrait, handler = avatar_tab
    notes = _upload(uploads, "notes.png", lambda p: p.write_text("not an image"))
    audio = _upload(uploads, "speech.wav", _speech)
    value = portrait.preprocess(ImageData(path=str(notes), orig_name="notes.png"))
    path, errors = _generate(handler, value, str(audio))
    assert path is None and errors == [
        "**Error:** --input-image: notes.png is not a readable image (cannot identify image file 'notes.png')."
    ]


def test_the_portrait_is_not_decoded_or_rewritten_by_gradio(uploads, avatar_tab):
    """image_mode=None: Gradio reads the header and passes the visitor's own file (no RGB conversion, no copy)."""
    portrait, _ = avatar_tab
    face = _upload(uploads, "face.png", lambda p: random_image(40, 40).convert("RGBA").save(p))
    assert portrait.preprocess(ImageData(path=str(face), orig_name="face.png")) == str(face)
