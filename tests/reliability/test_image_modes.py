"""Every image mode Pillow opens is decoded to 8-bit RGB without clipping (or refused naming the argument), with
its EXIF orientation applied: each case encodes a known grey ramp (or colour) and compares the decoded pixels."""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import pytest

from skyreels_diffusers.pipelines.video_io import load_image, to_rgb


RAMP = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (16, 1))  # 16 x 64, 0 .. 252
RED, WHITE = (255, 0, 0), (255, 255, 255)


def _reopened(image: PIL.Image.Image, fmt: str, **kwargs) -> PIL.Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    buffer.seek(0)
    return PIL.Image.open(buffer)


def _grey(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=-1)


def _half_transparent(mode: str) -> tuple[PIL.Image.Image, np.ndarray]:
    """Top half opaque red (grey 76 for grey modes), bottom half fully transparent over hidden black."""
    rgba = np.zeros((16, 64, 4), np.uint8)
    rgba[:8] = (*RED, 255)
    image = PIL.Image.fromarray(rgba, "RGBA")
    expected = np.empty((16, 64, 3), np.uint8)
    expected[:8], expected[8:] = RED, WHITE
    if mode == "LA":
        image = image.convert("LA")
        expected[:8] = np.asarray(PIL.Image.new("RGB", (1, 1), RED).convert("L"))[0, 0]
    return image, expected


def _palette_with_transparency() -> tuple[PIL.Image.Image, np.ndarray]:
    image, expected = _half_transparent("RGBA")
    return _reopened(image.convert("P"), "PNG"), expected


def _float_overshoot() -> tuple[PIL.Image.Image, np.ndarray]:
    """[0, 1] floats a resampler pushed a little past both ends: still read as [0, 1], the excursions clipped."""
    values = RAMP.astype(np.float32) / 255
    values[0, 0], values[-1, -1] = -0.0004, 1.0004
    expected = RAMP.copy()
    expected[-1, -1] = 255
    return PIL.Image.fromarray(values), _grey(expected)


CASES = {
    # 16-bit grey: before, Pillow's convert("RGB") clipped every value above 255 to white
    "16-bit grey PNG (I;16)": lambda: (
        _reopened(PIL.Image.fromarray(RAMP.astype(np.uint16) * 257), "PNG"),
        _grey(RAMP),
    ),
    "16-bit grey TIFF (I;16)": lambda: (
        _reopened(PIL.Image.fromarray(RAMP.astype(np.uint16) * 257), "TIFF"),
        _grey(RAMP),
    ),
    "16-bit big-endian grey (I;16B)": lambda: (
        PIL.Image.fromarray((RAMP.astype(np.uint16) * 257).astype(">u2")),
        _grey(RAMP),
    ),
    # 32-bit integer: scaled by the smallest of 8, 16, 31 bits holding the largest value
    "32-bit integer TIFF, full range (I)": lambda: (
        _reopened(PIL.Image.fromarray(np.rint(RAMP.astype(np.float64) * (2**31 - 1) / 255).astype(np.int32)), "TIFF"),
        _grey(RAMP),
    ),
    "32-bit integer, 16-bit values (I)": lambda: (PIL.Image.fromarray(RAMP.astype(np.int32) * 257), _grey(RAMP)),
    "32-bit integer, 8-bit values (I)": lambda: (PIL.Image.fromarray(RAMP.astype(np.int32)), _grey(RAMP)),
    # float: before, values in [0, 1] all became 0 or 1 of 255 (black)
    "float TIFF in [0, 1] (F)": lambda: (
        _reopened(PIL.Image.fromarray(RAMP.astype(np.float32) / 255), "TIFF"),
        _grey(RAMP),
    ),
    "float in [0, 255] (F)": lambda: (PIL.Image.fromarray(RAMP.astype(np.float32)), _grey(RAMP)),
    "float in [0, 1] with a resampling overshoot (F)": _float_overshoot,
    # alpha: transparent pixels over white (the letterbox fill), not their hidden colour
    "RGBA PNG": lambda: (lambda pair: (_reopened(pair[0], "PNG"), pair[1]))(_half_transparent("RGBA")),
    "LA PNG": lambda: (lambda pair: (_reopened(pair[0], "PNG"), pair[1]))(_half_transparent("LA")),
    "palette PNG with a transparent colour (P)": _palette_with_transparency,
    "premultiplied RGBa": lambda: (lambda pair: (pair[0].convert("RGBa"), pair[1]))(_half_transparent("RGBA")),
    "premultiplied La (opaque)": lambda: (
        PIL.Image.frombytes("La", RAMP.shape[::-1], np.stack([RAMP, np.full_like(RAMP, 255)], -1).tobytes()),
        _grey(RAMP),
    ),
    "PA": lambda: (lambda pair: (pair[0].convert("P").convert("PA"), pair[1]))(_half_transparent("RGBA")),
    # 8-bit modes Pillow converts itself (colour spaces converted, nothing clipped)
    "grey PNG (L)": lambda: (_reopened(PIL.Image.fromarray(RAMP), "PNG"), _grey(RAMP)),
    "1-bit PNG (1)": lambda: (
        _reopened(PIL.Image.fromarray(RAMP >= 128), "PNG"),
        _grey(np.where(RAMP >= 128, 255, 0).astype(np.uint8)),
    ),
    "CMYK TIFF": lambda: (
        _reopened(PIL.Image.new("CMYK", (64, 16), (0, 255, 255, 0)), "TIFF"),
        np.full((16, 64, 3), RED),
    ),
    "YCbCr": lambda: (PIL.Image.new("RGB", (64, 16), RED).convert("YCbCr"), None),
    "HSV": lambda: (PIL.Image.new("HSV", (64, 16), (0, 255, 255)), np.full((16, 64, 3), RED)),
    "LAB": lambda: (PIL.Image.new("LAB", (64, 16), (128, 128, 128)), np.full((16, 64, 3), 119)),
    "RGBX": lambda: (PIL.Image.new("RGB", (64, 16), RED).convert("RGBX"), np.full((16, 64, 3), RED)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_pillow_mode_decodes_without_clipping(case):
    image, expected = CASES[case]()
    rgb = np.asarray(to_rgb(image, "ref_images[0]"))
    assert rgb.dtype == np.uint8 and rgb.shape == (16, 64, 3)
    if expected is None:  # YCbCr: Pillow's own round trip of red
        expected = np.asarray(PIL.Image.new("RGB", (64, 16), RED).convert("YCbCr").convert("RGB"))
    assert np.abs(rgb.astype(int) - np.asarray(expected, dtype=int)).max() <= 1, case


def test_the_modes_cover_every_mode_pillow_knows():
    tested = {"I;16", "I;16B", "I", "F", "RGBA", "LA", "P", "RGBa", "La", "PA", "L", "1", "CMYK", "YCbCr", "HSV"}
    tested |= {"LAB", "RGBX", "RGB", "I;16L", "I;16N"}  # RGB throughout; I;16L/N are I;16 on little-endian hosts
    assert set(PIL.Image.MODES) <= tested, set(PIL.Image.MODES) - tested


@pytest.mark.parametrize(
    "values, message",
    [
        (np.array([[0.0, 300.0]], np.float32), r"a floating-point image with values in \[0, 300\]; expected 0 to 1"),
        (np.array([[0.0, np.nan]], np.float32), r"a floating-point image with values in"),
        (np.array([[-5.0, 0.5]], np.float32), r"a floating-point image with values in \[-5, 0\.5\]"),
        (np.array([[-1, 7]], np.int32), r"a 32-bit integer image with negative values"),
    ],
)
def test_values_without_a_meaning_are_refused_by_name(values, message):
    with pytest.raises(ValueError, match=rf"^`input_image`: {message}"):
        to_rgb(PIL.Image.fromarray(values), "input_image")


def test_an_unknown_mode_is_refused_by_name():
    image = PIL.Image.new("L", (4, 4))
    image._mode = "BGR;24"  # a raw mode no file opens as (stands for any mode Pillow may add)
    with pytest.raises(ValueError, match=r"^`image`: Pillow image mode 'BGR;24' is not supported"):
        to_rgb(image)


@pytest.mark.parametrize("mode", ["I;16", "F", "RGBA"])
def test_exif_orientation_is_applied_before_the_conversion(tmp_path, mode):
    """A 16-bit, float or RGBA image whose EXIF says "rotate 90" (orientation 6) comes out rotated and unclipped."""
    values = {"I;16": RAMP.astype(np.uint16) * 257, "F": RAMP.astype(np.float32) / 255}.get(mode)
    image = PIL.Image.fromarray(values) if values is not None else PIL.Image.fromarray(_grey(RAMP)).convert("RGBA")
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"rotated.{'tiff' if mode == 'F' else 'png'}"
    image.save(path, exif=exif.tobytes())
    rgb = np.asarray(load_image(path, name="input_image"))
    assert rgb.shape == (64, 16, 3)
    np.testing.assert_array_equal(rgb, np.rot90(_grey(RAMP), k=-1))


# ---------------------------------------------------------------------------------------------- reproduce_original
HIDDEN = (10, 200, 30)  # the colour transparent pixels hide


def _transparent_images() -> dict[str, PIL.Image.Image]:
    """Left half opaque red, right half fully transparent over `HIDDEN`, in every mode with transparency."""
    rgba = np.zeros((16, 64, 4), np.uint8)
    rgba[:, :32] = (*RED, 255)
    rgba[:, 32:] = (*HIDDEN, 0)
    image = PIL.Image.fromarray(rgba, "RGBA")
    palette = image.convert("P")
    palette.info["transparency"] = palette.getpixel((40, 0))
    return {"RGBA": image, "LA": image.convert("LA"), "P": _reopened(palette, "PNG"), "PA": image.convert("PA")}


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "PA"])
def test_reproduce_original_drops_alpha_as_the_original_does(mode):
    """The original opens images with Pillow's `convert("RGB")`: transparent pixels show the colour they hide.
    `reproduce_original=True` promises the original's video, so it decodes them so (before: composited over white
    under the switch too); the default still composites over white."""
    image = _transparent_images()[mode]
    original = np.asarray(image.convert("RGB"))
    assert not (original[:, 40:] == 255).all()  # the hidden colour (grey for LA), not white
    np.testing.assert_array_equal(np.asarray(to_rgb(image, drop_alpha=True)), original)
    default = np.asarray(to_rgb(image))
    assert (default[:, 40:] == 255).all() and (default[:, :8] == original[:, :8]).all()


def test_reproduce_original_reaches_the_decoders_of_every_front_door(tmp_path):
    """The references (pipeline and request), the portrait (pipeline and request): alpha dropped with the switch
    only. An RGBa image (premultiplied) keeps the colour Pillow gives it."""
    from skyreels_diffusers.app.request import GenerationRequest, validate
    from skyreels_diffusers.pipelines import SkyReelsV3ReferencePipeline, SkyReelsV3TalkingAvatarPipeline
    from tests.reliability.fault_cases import _wav

    image = _transparent_images()["RGBA"]
    path = tmp_path / "face.png"
    image.save(path)
    speech = _wav(tmp_path / "speech.wav", 1.0)
    for switch, right in ((False, WHITE), (True, HIDDEN)):
        refs, _, _ = SkyReelsV3ReferencePipeline.load_references([str(path)], "480P", 32, 32, drop_alpha=switch)
        portrait = SkyReelsV3TalkingAvatarPipeline.load_inputs(path, None, None, np.zeros((4, 2, 8)), 200, switch)[0]
        reference_request = GenerationRequest(
            task="reference_to_video", model="tiny", ref_imgs=[str(path)], reproduce_original=switch
        )
        avatar_request = GenerationRequest(
            task="talking_avatar",
            model="tiny",
            input_image=str(path),
            input_audio=str(speech),
            reproduce_original=switch,
        )
        decoded = [
            refs[0],
            portrait,
            validate(reference_request).media.ref_images[0],
            validate(avatar_request).media.portrait,
        ]
        for picture in decoded:
            assert picture.getpixel((40, 5)) == right and picture.getpixel((5, 5)) == RED
    premultiplied = image.convert("RGBa")
    np.testing.assert_array_equal(np.asarray(to_rgb(premultiplied, drop_alpha=True)), premultiplied.convert("RGB"))
