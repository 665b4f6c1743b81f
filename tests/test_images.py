"""Input images are checked against the job's limits from their header, before a pixel is decoded:
a small file that declares a huge image is refused by its declared size, whatever its pixel data."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from pipeline.images import InputError, decode
from pipeline.spec import LimitsSpec, StorageSpec


def declared(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height and whose pixel data breaks off early: decoding it
    fails, so only a check made from the header can name the size."""
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, format="PNG")
    data = buf.getvalue()
    return data[:data.index(b"IDAT") + 8]  # the chunk's first 4 bytes of compressed pixels


@pytest.mark.parametrize("size, message", [
    ((3000, 3000), "image: width 3000 is over limits.max_width 2048"),
    ((64, 128), "image: 64x128 is 8192 pixels, over limits.max_pixels 4096"),
])
def test_size_is_refused_from_the_header_before_decoding(size, message):
    with pytest.raises(InputError) as refused:
        decode("image", declared(*size), "RGB", StorageSpec(), None, LimitsSpec(max_pixels=4096))
    assert str(refused.value).startswith(message), refused.value


def test_a_truncated_image_within_the_limits_is_unreadable():
    """The same break-off in an image of allowed size is what decoding reports (so the test above
    sees the header check, not the decoder)."""
    with pytest.raises(InputError, match=r"^image: not a readable image \("):
        decode("image", declared(32, 32), "RGB", StorageSpec(), None, LimitsSpec())
