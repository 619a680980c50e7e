"""Resolution buckets of SkyReels-V3 (reference-to-video and extension; the avatar has its own tables).

Keys are height/width aspect ratios; values (height, width). The closest key to an input's H/W wins (first in
table order on ties), then both sides are floored to multiples of 16, exactly like the original.
"""

from __future__ import annotations

from .errors import PipelineInputError


ASPECT_RATIO_CONFIG: dict[str, dict[float, tuple[int, int]]] = {
    "480P": {
        0.38: (392, 1046),
        0.43: (420, 980),
        0.48: (444, 925),
        0.50: (452, 904),
        0.53: (466, 880),
        0.54: (470, 870),
        0.56: (480, 854),
        0.62: (506, 810),
        0.67: (522, 784),
        0.75: (554, 738),
        1.00: (640, 640),
        1.33: (740, 555),
        1.50: (784, 522),
        1.78: (854, 480),
        1.89: (880, 466),
        2.00: (906, 454),
        2.08: (924, 444),
    },
    "540P": {
        0.34: (416, 1216),
        0.38: (464, 1216),
        0.40: (464, 1152),
        0.43: (496, 1152),
        0.48: (496, 1024),
        0.50: (512, 1024),
        0.53: (512, 960),
        0.57: (544, 960),
        0.60: (544, 912),
        0.63: (576, 912),
        0.67: (576, 864),
        0.72: (624, 864),
        0.75: (624, 832),
        0.79: (656, 832),
        0.84: (656, 784),
        0.92: (720, 784),
        1.00: (720, 720),
        1.09: (784, 720),
        1.26: (784, 624),
        1.33: (832, 624),
        1.40: (832, 592),
        1.49: (880, 592),
        1.62: (880, 544),
        1.78: (960, 544),
        1.88: (960, 512),
        2.00: (1024, 512),
        2.13: (1024, 480),
    },
    "720P": {
        0.38: (588, 1568),
        0.43: (628, 1466),
        0.48: (666, 1388),
        0.50: (678, 1356),
        0.53: (698, 1318),
        0.54: (706, 1306),
        0.56: (720, 1280),
        0.62: (758, 1212),
        0.67: (784, 1176),
        0.75: (832, 1110),
        1.00: (960, 960),
        1.33: (1108, 832),
        1.50: (1176, 784),
        1.78: (1280, 720),
        1.89: (1320, 698),
        2.00: (1358, 680),
        2.08: (1386, 666),
    },
}

RESOLUTIONS = tuple(ASPECT_RATIO_CONFIG)
#: the longest side any bucket has (the avatar's 720P table): the limit of explicit sizes
MAX_SIDE = 2048


def closest_bucket(height: int, width: int, table: dict[float, tuple[int, int]]) -> tuple[int, int]:
    ratio = height / width
    key = min(table, key=lambda k: abs(k - ratio))
    return table[key]


def bucket_size(height: int, width: int, resolution: str) -> tuple[int, int]:
    """(height, width) of the bucket for an input of `height` x `width`, floored to multiples of 16."""
    if resolution not in ASPECT_RATIO_CONFIG:
        raise PipelineInputError("resolution", f"must be one of {list(ASPECT_RATIO_CONFIG)}, got {resolution!r}.")
    bucket_h, bucket_w = closest_bucket(height, width, ASPECT_RATIO_CONFIG[resolution])
    return bucket_h // 16 * 16, bucket_w // 16 * 16


def scale_to_long_side(height: int, width: int, long_side: int, multiple: int = 16) -> tuple[int, int]:
    """Shrink (never enlarge) so that the longer side is at most `long_side`, keeping multiples of `multiple`."""
    longest = max(height, width, long_side)
    return (
        max(multiple, height * long_side // longest // multiple * multiple),
        max(multiple, width * long_side // longest // multiple * multiple),
    )


def check_size(height: int | None, width: int | None) -> None:
    for name, value in (("height", height), ("width", width)):
        if value is not None and (not isinstance(value, int) or not 16 <= value <= MAX_SIDE or value % 16):
            raise PipelineInputError(
                name,
                f"must be a multiple of 16 in [16, {MAX_SIDE}] (the largest bucket side; "
                f"memory grows with the area), got {value!r}.",
            )
    if (height is None) != (width is None):
        raise PipelineInputError(
            "height" if height is None else "width",
            "must be given with the other side (or neither, to use the resolution buckets).",
        )


# Talking-avatar buckets (key = H/W; values are multiples of 16 already; closest key, first on ties).
AVATAR_ASPECT_RATIOS: dict[str, dict[float, tuple[int, int]]] = {
    "480P": {  # the original's ASPECT_RATIO_627 (its order kept: 1.86 comes before 1.73)
        0.26: (320, 1216),
        0.38: (384, 1024),
        0.50: (448, 896),
        0.577: (480, 832),
        0.67: (512, 768),
        0.82: (576, 704),
        1.00: (640, 640),
        1.22: (704, 576),
        1.50: (768, 512),
        1.86: (832, 448),
        1.73: (832, 480),
        2.00: (896, 448),
        2.50: (960, 384),
        2.83: (1088, 384),
        3.60: (1152, 320),
        3.80: (1216, 320),
        4.00: (1280, 320),
    },
    # The original rejects 540P for the avatar; this is the family's own 540P table (reference/extension), whose
    # sizes are all multiples of 16 around 540 x 960.
    "540P": dict(ASPECT_RATIO_CONFIG["540P"]),
    "720P": {  # the original's ASPECT_RATIO_960
        0.22: (448, 2048),
        0.29: (512, 1792),
        0.36: (576, 1600),
        0.45: (640, 1408),
        0.55: (704, 1280),
        0.56: (720, 1280),
        0.63: (768, 1216),
        0.76: (832, 1088),
        0.88: (896, 1024),
        1.00: (960, 960),
        1.14: (1024, 896),
        1.31: (1088, 832),
        1.50: (1152, 768),
        1.58: (1216, 768),
        1.82: (1280, 704),
        1.78: (1280, 720),
        1.91: (1344, 704),
        2.20: (1408, 640),
        2.30: (1472, 640),
        2.67: (1536, 576),
        2.89: (1664, 576),
        3.62: (1856, 512),
        3.75: (1920, 512),
    },
}


def avatar_bucket_size(height: int, width: int, resolution: str) -> tuple[int, int]:
    if resolution not in AVATAR_ASPECT_RATIOS:
        raise PipelineInputError("resolution", f"must be one of {list(AVATAR_ASPECT_RATIOS)}, got {resolution!r}.")
    return closest_bucket(height, width, AVATAR_ASPECT_RATIOS[resolution])
