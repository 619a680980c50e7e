"""Resolution buckets of SkyReels-V3 (reference-to-video and extension; the avatar has its own tables).

Keys are height/width aspect ratios; values (height, width). The closest key to an input's H/W wins (first in
table order on ties), then both sides are floored to multiples of 16, exactly like the original.
"""

from __future__ import annotations

ASPECT_RATIO_CONFIG: dict[str, dict[float, tuple[int, int]]] = {
    "480P": {
        0.38: (392, 1046), 0.43: (420, 980), 0.48: (444, 925), 0.50: (452, 904), 0.53: (466, 880),
        0.54: (470, 870), 0.56: (480, 854), 0.62: (506, 810), 0.67: (522, 784), 0.75: (554, 738),
        1.00: (640, 640), 1.33: (740, 555), 1.50: (784, 522), 1.78: (854, 480), 1.89: (880, 466),
        2.00: (906, 454), 2.08: (924, 444),
    },
    "540P": {
        0.34: (416, 1216), 0.38: (464, 1216), 0.40: (464, 1152), 0.43: (496, 1152), 0.48: (496, 1024),
        0.50: (512, 1024), 0.53: (512, 960), 0.57: (544, 960), 0.60: (544, 912), 0.63: (576, 912),
        0.67: (576, 864), 0.72: (624, 864), 0.75: (624, 832), 0.79: (656, 832), 0.84: (656, 784),
        0.92: (720, 784), 1.00: (720, 720), 1.09: (784, 720), 1.26: (784, 624), 1.33: (832, 624),
        1.40: (832, 592), 1.49: (880, 592), 1.62: (880, 544), 1.78: (960, 544), 1.88: (960, 512),
        2.00: (1024, 512), 2.13: (1024, 480),
    },
    "720P": {
        0.38: (588, 1568), 0.43: (628, 1466), 0.48: (666, 1388), 0.50: (678, 1356), 0.53: (698, 1318),
        0.54: (706, 1306), 0.56: (720, 1280), 0.62: (758, 1212), 0.67: (784, 1176), 0.75: (832, 1110),
        1.00: (960, 960), 1.33: (1108, 832), 1.50: (1176, 784), 1.78: (1280, 720), 1.89: (1320, 698),
        2.00: (1358, 680), 2.08: (1386, 666),
    },
}

RESOLUTIONS = tuple(ASPECT_RATIO_CONFIG)


def closest_bucket(height: int, width: int, table: dict[float, tuple[int, int]]) -> tuple[int, int]:
    ratio = height / width
    key = min(table, key=lambda k: abs(k - ratio))
    return table[key]


def bucket_size(height: int, width: int, resolution: str) -> tuple[int, int]:
    """(height, width) of the bucket for an input of `height` x `width`, floored to multiples of 16."""
    if resolution not in ASPECT_RATIO_CONFIG:
        raise ValueError(f"`resolution` must be one of {list(ASPECT_RATIO_CONFIG)}, got {resolution!r}.")
    bucket_h, bucket_w = closest_bucket(height, width, ASPECT_RATIO_CONFIG[resolution])
    return bucket_h // 16 * 16, bucket_w // 16 * 16


def scale_to_long_side(height: int, width: int, long_side: int, multiple: int = 16) -> tuple[int, int]:
    """Shrink (never enlarge) so that the longer side is at most `long_side`, keeping multiples of `multiple`."""
    longest = max(height, width, long_side)
    return (max(multiple, height * long_side // longest // multiple * multiple),
            max(multiple, width * long_side // longest // multiple * multiple))


def check_size(height: int | None, width: int | None) -> None:
    for name, value in (("height", height), ("width", width)):
        if value is not None and (not isinstance(value, int) or value <= 0 or value % 16):
            raise ValueError(f"`{name}` must be a positive multiple of 16, got {value!r}.")
    if (height is None) != (width is None):
        raise ValueError("Pass both `height` and `width` (or neither, to use the resolution buckets).")
