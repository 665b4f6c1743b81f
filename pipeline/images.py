"""Decode the manifest's input images and masks on CPU (never inside a GPU actor).

A value may be encoded bytes (PNG, JPEG, WebP), a Hugging Face image struct {bytes, path}, or a
URI string read through the storage layer, only where the job's Access allows (pipeline/access.py).
Problems raise InputError with a message that names the column, which the prepare step turns into
the row's error.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline import storage
from pipeline.access import Access, OutsideError, check
from pipeline.spec import LimitsSpec, StorageSpec

# PIL's own decompression-bomb guard, a backstop for the job's limits.max_pixels (checked from the
# header before decoding): Image.open refuses images over twice this many pixels.
Image.MAX_IMAGE_PIXELS = 8192 * 8192


class InputError(ValueError):
    pass


def _read(column: str, value: Any, storage_spec: StorageSpec, access: Access) -> bytes:
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value:
        try:
            return storage.read_bytes(check(value, access), storage_spec)
        except OutsideError as err:
            raise InputError(f"{column}: {err}") from None
        except (FileNotFoundError, IsADirectoryError):
            raise InputError(f"{column}: no file at {value}") from None
        except (OSError, ValueError) as err:
            raise InputError(storage.redact(f"{column}: cannot read {value}: {err}", storage_spec)) from None
    raise InputError(f"{column}: missing")


def decode(column: str, value: Any, mode: str, storage_spec: StorageSpec, access: Access,
           limits: LimitsSpec) -> np.ndarray:
    """The image in ``value`` as a uint8 array: HxWx3 for mode "RGB", HxW for mode "L"."""
    data = _read(column, value, storage_spec, access)
    try:
        with Image.open(io.BytesIO(data)) as img:
            # Image.open reads the header only: a small file may declare a huge image.
            problem = limits.size_problem(*img.size)
            if problem:
                raise InputError(f"{column}: {problem}")
            img.load()
            return np.asarray(img.convert(mode))
    except InputError:
        raise
    except Image.DecompressionBombError as err:
        raise InputError(f"{column}: over limits.max_pixels {limits.max_pixels} ({err})") from None
    except Exception as err:  # noqa: BLE001 - PIL's decoders also raise SyntaxError, ValueError, ... on bad bytes
        # PIL's own text for an unknown format names the buffer's address, which differs per run.
        detail = "no known image format" if isinstance(err, UnidentifiedImageError) else str(err)
        raise InputError(f"{column}: not a readable image ({type(err).__name__}: {detail})") from None


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 image as PNG bytes (lossless)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def keep_unmasked(original: np.ndarray, generated: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The generated pixels where the uint8 ``mask`` is white (>= 128: repaint), the original ones
    elsewhere. Inpainting pipelines decode the whole image from latents, so without this the kept
    pixels drift by the VAE's reconstruction error. ``original`` and ``generated`` are H x W x 3
    in one value range."""
    return np.where((np.asarray(mask) >= 128)[..., None], generated, original)
