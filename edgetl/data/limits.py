"""The one limit on image dimensions, shared by every place Python decodes a user's image.

An image is refused from its header, before any pixel is decoded, when a side exceeds
:data:`MAX_IMAGE_SIDE`, the product exceeds :data:`MAX_IMAGE_PIXELS`, or the longer side is more
than :data:`MAX_ASPECT_RATIO` times the shorter. A file of a few hundred bytes can declare a
1 x 1,000,000 PNG; and since evaluation resizes the shorter side to the input size, a strip one
pixel high grows by its whole length (1 x 65535 at 224 px: 256 x 16.8 million pixels, 12 GiB):
the ratio bounds what any accepted image becomes. The device runner
(``deploy/native/src/image_decode.cpp``) applies the same numbers.
"""

from __future__ import annotations

#: largest width or height accepted (also the largest ``image_size``)
MAX_IMAGE_SIDE = 65535
#: largest width x height accepted: 2**26 (64 Mi pixels, 192 MiB as 8-bit RGB)
MAX_IMAGE_PIXELS = 2**26
#: largest ratio of the longer side to the shorter (a 64:1 panorama is accepted)
MAX_ASPECT_RATIO = 64


def image_size_problem(width: int, height: int) -> str | None:
    """Why a ``width`` x ``height`` image is refused, or None when it is within the limits."""
    if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
        return f"{width}x{height} pixels: a side exceeds {MAX_IMAGE_SIDE}"
    if width * height > MAX_IMAGE_PIXELS:
        return f"{width}x{height} pixels: more than {MAX_IMAGE_PIXELS} (2**26) in all"
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return f"{width}x{height} pixels: one side more than {MAX_ASPECT_RATIO} times the other"
    return None
