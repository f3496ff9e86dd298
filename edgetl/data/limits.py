"""The one limit on image dimensions, shared by every place Python decodes a user's image.

An image is refused from its header, before any pixel is decoded, when a side exceeds
:data:`MAX_IMAGE_SIDE` or the product exceeds :data:`MAX_IMAGE_PIXELS`: a file of a few hundred
bytes can declare a 1 x 1,000,000 PNG whose resize to the input size asks for gigabytes. The
device runner (``deploy/native/src/image.cpp``) applies the same two numbers.
"""

from __future__ import annotations

#: largest width or height accepted (also the largest ``image_size``)
MAX_IMAGE_SIDE = 65535
#: largest width x height accepted: 2**26 (64 Mi pixels, 192 MiB as 8-bit RGB)
MAX_IMAGE_PIXELS = 2**26


def image_size_problem(width: int, height: int) -> str | None:
    """Why a ``width`` x ``height`` image is refused, or None when it is within the limits."""
    if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
        return f"{width}x{height} pixels: a side exceeds {MAX_IMAGE_SIDE}"
    if width * height > MAX_IMAGE_PIXELS:
        return f"{width}x{height} pixels: more than {MAX_IMAGE_PIXELS} (2**26) in all"
    return None
