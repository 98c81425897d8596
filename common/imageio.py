"""Bytes -> one grayscale float image, or an ImageError that says exactly why not.

Everything that reads an image (dataset sources, `fedxray data check`, the upload endpoint) goes through
`decode_image`, so training and serving see identical pixels and every bad input gets the same clear reason.
Output convention: float32 (H, W) in [0, 1], MONOCHROME2 (0 = black/air, 1 = white/bone).

DICOM notes: only pixel-module attributes (and ViewPosition) are ever read, so no patient data can leak
into errors or logs. Sizes are checked from the header before any pixel is decoded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from io import BytesIO

import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from common.errors import ImageError

DEFAULT_MAX_PIXELS = 60_000_000
NOT_AN_IMAGE = "not a PNG, JPEG or DICOM image"

# Formats Pillow may open. A whitelist keeps uploads away from plugins such as EPS (runs Ghostscript).
_PIL_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP", "PPM")  # JPEG also yields MPO
_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, the same weights Pillow uses for RGB -> L
_GRAY_PI = ("MONOCHROME1", "MONOCHROME2")


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # float32 (H, W) in [0, 1], MONOCHROME2 convention
    width: int
    height: int
    format: str  # "png" | "jpeg" | "dicom" | other Pillow format, lowercased
    bit_depth: int
    view: str | None  # DICOM ViewPosition ("PA", "AP", "LL"...), else None


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file has a 128-byte preamble followed by the magic b"DICM"."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def read_image(
    path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_resolution: int = 1
) -> DecodedImage:
    """Read a file and decode it; every error carries the path so a data check can list the culprits."""
    where = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageError("file not found", path=where) from None
    except IsADirectoryError:
        raise ImageError("is a directory, not an image file", path=where) from None
    except OSError as e:
        raise ImageError(f"cannot read file: {e.strerror or e}", path=where) from None
    if not data:
        raise ImageError("empty file (0 bytes)", path=where)
    try:
        return decode_image(data, name=os.path.basename(where), max_pixels=max_pixels, min_resolution=min_resolution)
    except ImageError as e:
        raise ImageError(e.reason, path=where, too_large=e.too_large) from e.__cause__


def decode_image(
    data: bytes, *, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, min_resolution: int = 1
) -> DecodedImage:
    """Decode PNG/JPEG/other Pillow formats or DICOM. `name` only serves to try header-less `.dcm` files."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    if is_dicom(data):
        return _decode_dicom(data, False, max_pixels, min_resolution)
    img = _open_pil(data)
    if img is None:
        if name and name.lower().endswith(".dcm"):  # raw DICOM data set without the Part 10 preamble
            return _decode_dicom(data, True, max_pixels, min_resolution)
        raise ImageError(NOT_AN_IMAGE)
    return _decode_pil(img, max_pixels, min_resolution)


# --------------------------------------------------------------------------------------------- helpers


def _short(e: BaseException) -> str:
    """An exception message on one line, capped: pydicom lists every plugin it tried on its own line."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return (text[:300] + ("..." if len(text) > 300 else "")) or type(e).__name__


def _check_size(width: int, height: int, max_pixels: int, min_resolution: int) -> None:
    """Called with header dimensions, before decoding, so a decompression bomb never allocates memory."""
    n = width * height
    if n > max_pixels:
        raise ImageError(
            f"image has {width}x{height} = {n:,} pixels, above the limit of {max_pixels:,}", too_large=True
        )
    if min(width, height) < min_resolution:
        raise ImageError(
            f"resolution {width}x{height} px is below the minimum of {min_resolution} px (shorter side)"
        )


def _finish(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 1.0).astype(np.float32)


# ------------------------------------------------------------------------------------------------ Pillow


def _open_pil(data: bytes) -> Image.Image | None:
    """Open (header only). None when Pillow does not recognise the bytes at all."""
    sniffed = next((fmt for sig, fmt in _SIGNATURES.items() if data.startswith(sig)), None)
    try:
        return Image.open(BytesIO(data), formats=_PIL_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image is too large to decode safely: {_short(e)}", too_large=True) from e
    except UnidentifiedImageError as e:
        if sniffed:  # right signature but unparseable header (bad CRC, cut inside the header...)
            raise ImageError(f"truncated or corrupt {sniffed} data: header cannot be parsed") from e
        return None
    except Exception as e:
        raise ImageError(f"truncated or corrupt {sniffed or 'image'} data: {_short(e)}") from e


def _decode_pil(img: Image.Image, max_pixels: int, min_resolution: int) -> DecodedImage:
    fmt = "jpeg" if img.format == "MPO" else (img.format or "image").lower()  # MPO = camera JPEG
    _check_size(img.width, img.height, max_pixels, min_resolution)
    try:
        img.load()  # decode everything now so a truncated file fails here, not in a training worker
        img = ImageOps.exif_transpose(img)  # phone photos of films: show them the way a viewer does
        mode = img.mode
        if mode == "L":
            x, bits = np.asarray(img, dtype=np.float64) / 255.0, 8
        elif mode == "I" or mode.startswith("I;16"):
            x, bits = np.asarray(img, dtype=np.float64) / 65535.0, 16
        elif mode == "F":
            x, bits = np.nan_to_num(np.asarray(img, dtype=np.float64)), 32
        else:  # 1, P, PA, LA, RGB, RGBA, CMYK, YCbCr...: alpha is dropped, colour goes through luma
            bits = 1 if mode == "1" else 8
            x = np.asarray(img.convert("RGB").convert("L"), dtype=np.float64) / 255.0
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image is too large to decode safely: {_short(e)}", too_large=True) from e
    except Exception as e:
        raise ImageError(f"truncated or corrupt {fmt.upper()} data: {_short(e)}") from e
    return DecodedImage(_finish(x), x.shape[1], x.shape[0], fmt, bits, None)


# ------------------------------------------------------------------------------------------------- DICOM


def _decode_dicom(data: bytes, force: bool, max_pixels: int, min_resolution: int) -> DecodedImage:
    try:
        ds = pydicom.dcmread(BytesIO(data), force=force)
    except Exception as e:
        raise ImageError(f"unreadable DICOM file: {_short(e)}") from e
    if force and "PixelData" not in ds:  # forced reads accept almost any bytes: don't call them DICOM
        raise ImageError(f"{NOT_AN_IMAGE} (named .dcm, but has no DICOM header or pixel data)")
    try:
        return _dicom_image(ds, max_pixels, min_resolution)
    except ImageError:
        raise
    except Exception as e:  # malformed attribute values (non-numeric Rows, bad LUT...)
        raise ImageError(f"invalid DICOM file: {_short(e)}") from e


def _transfer_syntax(ds: pydicom.Dataset) -> UID:
    """The file's transfer syntax; for header-less files, the encoding pydicom guessed while reading."""
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is None:
        implicit, little = ds.original_encoding
        ts = ImplicitVRLittleEndian if implicit is not False else (
            ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian
        )
        ds.file_meta = getattr(ds, "file_meta", None) or pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ts
    return UID(ts)


def _first(value) -> float:
    """WindowCenter/Width may be multi-valued (several presets): use the first, like apply_voi_lut(index=0)."""
    return float(value[0] if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else value)


def _dicom_image(ds: pydicom.Dataset, max_pixels: int, min_resolution: int) -> DecodedImage:
    if "PixelData" not in ds:
        raise ImageError("DICOM file has no pixel data")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise ImageError(f"multi-frame DICOM ({frames} frames) is not supported: export a single frame")
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if not rows or not cols:
        raise ImageError("DICOM file has no image size (Rows/Columns missing)")
    _check_size(cols, rows, max_pixels, min_resolution)
    pi = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip().upper()
    if pi not in (*_GRAY_PI, "RGB") and not pi.startswith("YBR"):
        raise ImageError(f"DICOM photometric interpretation {pi} is not supported: export as grayscale")

    ts = _transfer_syntax(ds)
    try:
        arr = ds.pixel_array  # pydicom 3 returns YBR_* as RGB by default
    except Exception as e:
        if not ts.is_transfer_syntax or ts.is_compressed:
            raise ImageError(
                f"DICOM transfer syntax {ts.name} ({ts}) cannot be decoded here: {_short(e)}; "
                "convert to uncompressed (explicit VR little endian)"
            ) from e
        raise ImageError(f"corrupt DICOM pixel data: {_short(e)}") from e

    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
    if arr.ndim == 3:  # colour: no modality/VOI LUTs apply; scale by the stored range, then luma
        x = (arr.astype(np.float64) / (2**bits - 1)) @ _LUMA
    elif arr.ndim == 2:
        x = _dicom_gray(arr, ds, bits)
        if pi == "MONOCHROME1":  # 0 = white: flip to the MONOCHROME2 convention used everywhere else
            x = 1.0 - x
    else:
        raise ImageError(f"DICOM pixel data has unexpected shape {arr.shape}")
    view = str(ds.get("ViewPosition") or "").strip().upper() or None
    return DecodedImage(_finish(x), cols, rows, "dicom", bits, view)


def _dicom_gray(arr: np.ndarray, ds: pydicom.Dataset, bits: int) -> np.ndarray:
    """Stored values -> modality values (Rescale/LUT) -> [0, 1] via the VOI LUT, the window, or the bit range.

    Without a VOI the bit range (not the image min/max) is used, so brightness is not stretched per image and
    a 16-bit DICOM decodes exactly like a 16-bit PNG of the same values.
    """
    x = apply_modality_lut(arr, ds)
    if ds.get("VOILUTSequence"):
        n, first = ds.VOILUTSequence[0].LUTDescriptor[:2]
        n = n or 65536
        outputs = apply_voi_lut(np.arange(first, first + n), ds, index=0)  # every LUT entry
        lo, hi = float(outputs.min()), float(outputs.max())
        x = apply_voi_lut(np.clip(np.rint(x), first, first + n - 1).astype(np.int64), ds, index=0)
    elif "WindowCenter" in ds and "WindowWidth" in ds and _first(ds.WindowWidth) > 0:
        c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
        if str(ds.get("VOILUTFunction") or "LINEAR").upper() == "SIGMOID":
            return 1.0 / (1.0 + np.exp(-4.0 * (np.asarray(x, dtype=np.float64) - c) / w))
        lo, hi = c - w / 2, c + w / 2
    else:
        signed = int(ds.get("PixelRepresentation") or 0) == 1
        lo_s, hi_s = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        has_lut = bool(ds.get("ModalityLUTSequence")) and bits <= 16
        ends = apply_modality_lut(np.arange(lo_s, hi_s + 1) if has_lut else np.array([lo_s, hi_s]), ds)
        lo, hi = float(np.min(ends)), float(np.max(ends))
    if hi <= lo:
        return np.zeros(x.shape)
    return (np.asarray(x, dtype=np.float64) - lo) / (hi - lo)
