"""Bytes -> one grayscale float image, or an ImageError that says exactly why not (and a reason code).

Everything that reads an image (dataset sources, `fedxray data check`, the upload endpoint) goes through
`decode_image`, so training and serving see identical pixels and every bad input gets the same clear reason.
Output convention: float32 (H, W) in [0, 1], MONOCHROME2 (0 = black/air, 1 = white/bone).

Formats: PNG, JPEG, DICOM, and (read the same way, through Pillow) TIFF, BMP, WebP and GIF. Anything holding
more than one frame (animated GIF/WebP, APNG, multi-page TIFF, multi-frame DICOM) is refused: which frame is
"the" X-ray is not ours to guess. A camera MPO file is a JPEG whose first frame is the picture itself.

Display mapping (what viewers do, so two encodings of one picture decode alike):
- DICOM: modality LUT (RescaleSlope/Intercept or a LUT) -> VOI LUT or window when the file has one; without
  one, a window from the image's own modality values (min..max), so `RescaleSlope=2` with the pixels halved
  decodes exactly like the original.
- PNG/TIFF deeper than 8 bits carry no display mapping either: the same min..max window.
- 8-bit images are display images already: value / 255.
A constant image has no window: it keeps its level in the bit range (the input-quality gate refuses it).

Memory: sizes are checked from the header before any pixel is decoded, and an image whose longer side exceeds
`max_side` is reduced by an integer factor (block mean; JPEG already while decoding, via libjpeg's DCT
scaling) before anything is converted to float, so the float copy never has the full resolution.
`width`/`height` stay the original size. DICOM notes: only pixel-module attributes (and ViewPosition) are ever
read, so no patient data can leak into errors or logs.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from io import BytesIO
from typing import Callable

import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from common.errors import ImageError

DEFAULT_MAX_PIXELS = 60_000_000
DEFAULT_MAX_SIDE = 2048  # longer side after decoding; 4x the largest model input, 2x ChestX-ray14's 1024 px
NOT_AN_IMAGE = "not a PNG, JPEG or DICOM image (TIFF, BMP, WebP and single-frame GIF are read too)"

# Formats Pillow may open. A whitelist keeps uploads away from plugins such as EPS (runs Ghostscript).
_PIL_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP", "GIF")  # JPEG also yields MPO
_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, the same weights Pillow uses for RGB -> L
_GRAY_PI = ("MONOCHROME1", "MONOCHROME2")
_CHUNK_PIXELS = 1 << 21  # rows are mapped to float in chunks of about this many pixels

# pydicom logs every failing decoder plugin with a full traceback (LOGGER.exception) before raising; the
# reasons are all in the exception we turn into one ImageError line, so the traceback records are dropped.
logging.getLogger("pydicom.pixels.decoders.base").addFilter(lambda record: not record.exc_info)


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # float32 (h, w) in [0, 1], MONOCHROME2 convention; (h, w) <= (height, width)
    width: int          # original size, in pixels
    height: int
    format: str  # "png" | "jpeg" | "dicom" | other Pillow format, lowercased
    bit_depth: int
    view: str | None  # DICOM ViewPosition ("PA", "AP", "LL"...), else None
    colourfulness: float = 0.0  # Hasler & Suesstrunk (2003) on 0-255 RGB; 0 for grayscale data

    @property
    def scale(self) -> float:
        """Decoded pixels per original pixel (1 unless the image was reduced to max_side)."""
        return self.pixels.shape[1] / self.width


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file has a 128-byte preamble followed by the magic b"DICM"."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def read_image(
    path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_resolution: int = 1,
    max_side: int | None = DEFAULT_MAX_SIDE,
) -> DecodedImage:
    """Read a file and decode it; every error carries the path so a data check can list the culprits."""
    where = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageError("file not found", path=where, code="not_found") from None
    except IsADirectoryError:
        raise ImageError("is a directory, not an image file", path=where, code="not_an_image") from None
    except OSError as e:
        raise ImageError(f"cannot read file: {e.strerror or e}", path=where, code="unreadable") from None
    if not data:
        raise ImageError("empty file (0 bytes)", path=where, code="empty")
    try:
        return decode_image(data, name=os.path.basename(where), max_pixels=max_pixels,
                            min_resolution=min_resolution, max_side=max_side)
    except ImageError as e:
        raise ImageError(e.reason, path=where, too_large=e.too_large, code=e.code) from e.__cause__


def decode_image(
    data: bytes, *, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, min_resolution: int = 1,
    max_side: int | None = DEFAULT_MAX_SIDE,
) -> DecodedImage:
    """Decode PNG/JPEG/other Pillow formats or DICOM. `name` only serves to try header-less `.dcm` files."""
    if not data:
        raise ImageError("empty file (0 bytes)", code="empty")
    if is_dicom(data):
        return _decode_dicom(data, False, max_pixels, min_resolution, max_side)
    img = _open_pil(data)
    if img is None:
        if name and name.lower().endswith(".dcm"):  # raw DICOM data set without the Part 10 preamble
            return _decode_dicom(data, True, max_pixels, min_resolution, max_side)
        raise ImageError(NOT_AN_IMAGE, code="not_an_image")
    return _decode_pil(img, max_pixels, min_resolution, max_side)


@dataclass(frozen=True)
class ImageHeader:
    """What the header says, before any pixel is decoded: enough to budget memory and refuse early."""
    width: int
    height: int
    format: str
    bytes_per_pixel: int  # of the full-resolution buffer the decoder allocates

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def decode_bytes(self, max_side: int | None = DEFAULT_MAX_SIDE) -> int:
        """An upper estimate of decode_image's peak memory for this image (measured in
        benchmarks/api_hostile.py): the decoder's buffer, its numpy copy and a conversion at full resolution
        (a JPEG decodes at its DCT scale), plus the float64/float32 output at the reduced size."""
        f = reduction_factor(self.width, self.height, max_side)
        scale = 1 if self.format not in ("jpeg", "mpo") else min(8, 1 << (f.bit_length() - 1))
        full = self.pixels // (scale * scale)
        return full * (3 * self.bytes_per_pixel + 1) + (self.pixels // (f * f)) * 16 + (1 << 20)


_PIL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "LA": 4, "PA": 4,
              "RGB": 4, "RGBA": 4, "RGBX": 4, "CMYK": 4, "YCbCr": 4, "I": 4, "F": 4}


def probe_image(data: bytes, *, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                min_resolution: int = 1) -> ImageHeader:
    """Size and sample layout from the header alone (no pixel decoded); the same checks as decode_image."""
    if not data:
        raise ImageError("empty file (0 bytes)", code="empty")
    if is_dicom(data) or (name or "").lower().endswith(".dcm"):
        try:
            ds = pydicom.dcmread(BytesIO(data), force=not is_dicom(data), stop_before_pixels=True)
            rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
            bpp = max(1, int(ds.get("BitsAllocated") or 8) // 8) * int(ds.get("SamplesPerPixel") or 1)
        except Exception:
            rows = cols = 0
        if rows and cols:
            _check_size(cols, rows, max_pixels, min_resolution)
            return ImageHeader(cols, rows, "dicom", bpp)
        if is_dicom(data):  # decode_image gives the precise reason
            decode_image(data, name=name, max_pixels=max_pixels, min_resolution=min_resolution)
    img = _open_pil(data)
    if img is None:
        raise ImageError(NOT_AN_IMAGE, code="not_an_image")
    _check_size(img.width, img.height, max_pixels, min_resolution)
    _check_frames(img)
    return ImageHeader(img.width, img.height, (img.format or "image").lower(), _PIL_BYTES.get(img.mode, 4))


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
            f"image has {width}x{height} = {n:,} pixels, above the limit of {max_pixels:,}", too_large=True,
            code="too_many_pixels",
        )
    if min(width, height) < min_resolution:
        raise ImageError(
            f"resolution {width}x{height} px is below the minimum of {min_resolution} px (shorter side)",
            code="too_small",
        )


def _check_frames(img: Image.Image) -> None:
    frames = int(getattr(img, "n_frames", 1) or 1)
    if frames > 1 and img.format != "MPO":
        raise ImageError(f"{img.format} with {frames} frames (animated or multi-page) is not supported: "
                         f"export the one image to use as PNG", code="multi_frame")


def reduction_factor(width: int, height: int, max_side: int | None) -> int:
    """The integer factor that brings the longer side to at most max_side (1 = full resolution)."""
    return 1 if not max_side else max(1, math.ceil(max(width, height) / max_side))


def _block_mean(arr: np.ndarray, f: int, to_float: Callable[[np.ndarray], np.ndarray] | None = None
                ) -> np.ndarray:
    """(H, W[, C]) -> float64 (H//f, W//f[, C]): `to_float` applied to row chunks, then f x f block means.

    Only one chunk of rows is ever held as float, so a 40-Mpx image never has a 320 MB float copy. Edge rows
    and columns that do not fill a block (fewer than f) are dropped.
    """
    to_float = to_float or (lambda a: a.astype(np.float64))
    h, w = (arr.shape[0] // f) * f, (arr.shape[1] // f) * f
    if f == 1:
        return np.asarray(to_float(arr), dtype=np.float64)
    step = max(f, (_CHUNK_PIXELS // max(1, w)) // f * f)
    out = []
    for r in range(0, h, step):
        block = np.asarray(to_float(arr[r:min(r + step, h), :w]), dtype=np.float64)
        out.append(block.reshape(block.shape[0] // f, f, w // f, f, *block.shape[2:]).mean(axis=(1, 3)))
    return np.concatenate(out, axis=0)


def _min_max(arr: np.ndarray, to_float: Callable[[np.ndarray], np.ndarray]) -> tuple[float, float]:
    """min and max of to_float(arr), a chunk of rows at a time."""
    step = max(1, _CHUNK_PIXELS // max(1, arr.shape[1]))
    parts = [to_float(arr[r:r + step]) for r in range(0, arr.shape[0], step)]
    return min(float(p.min()) for p in parts), max(float(p.max()) for p in parts)


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler & Suesstrunk's colourfulness of (H, W, 3) RGB on 0-255: 0 gray, ~15 slightly, ~33 moderately."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    rg, yb = r - g, 0.5 * (r + g) - b
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def _window(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (x - lo) / (hi - lo)


def _finish(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 1.0).astype(np.float32)


# ------------------------------------------------------------------------------------------------ Pillow


def _open_pil(data: bytes) -> Image.Image | None:
    """Open (header only). None when Pillow does not recognise the bytes at all."""
    sniffed = next((fmt for sig, fmt in _SIGNATURES.items() if data.startswith(sig)), None)
    try:
        return Image.open(BytesIO(data), formats=_PIL_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image is too large to decode safely: {_short(e)}", too_large=True,
                         code="too_many_pixels") from e
    except UnidentifiedImageError as e:
        if sniffed:  # right signature but unparseable header (bad CRC, cut inside the header...)
            raise ImageError(f"truncated or corrupt {sniffed} data: header cannot be parsed", code="corrupt") from e
        return None
    except Exception as e:
        raise ImageError(f"truncated or corrupt {sniffed or 'image'} data: {_short(e)}", code="corrupt") from e


def _decode_pil(img: Image.Image, max_pixels: int, min_resolution: int, max_side: int | None) -> DecodedImage:
    fmt = "jpeg" if img.format == "MPO" else (img.format or "image").lower()  # MPO = camera JPEG
    _check_size(img.width, img.height, max_pixels, min_resolution)
    _check_frames(img)
    width, height = img.size
    f = reduction_factor(width, height, max_side)
    try:
        if f > 1 and img.format in ("JPEG", "MPO"):  # libjpeg scales by 1/2, 1/4 or 1/8 while decoding
            img.draft(img.mode, (width // f, height // f))
        img.load()  # decode everything now so a truncated file fails here, not in a training worker
        if img.getexif().get(0x0112) in (5, 6, 7, 8):  # the EXIF orientation swaps width and height
            width, height = height, width
        img = ImageOps.exif_transpose(img)  # phone photos of films: show them the way a viewer does
        f = reduction_factor(img.width, img.height, max_side)  # what is left after a JPEG's DCT scaling
        mode, colour = img.mode, 0.0
        if mode == "L":
            x, bits = _block_mean(np.asarray(img), f) / 255.0, 8
        elif mode == "I" or mode.startswith("I;16"):
            a, bits = np.asarray(img), 16
            x = _own_window(_block_mean(a, f), float(a.min()), float(a.max()), 65535.0)
        elif mode == "F":
            x, bits = np.nan_to_num(_block_mean(np.asarray(img), f)), 32
        else:  # 1, P, PA, LA, RGB, RGBA, CMYK, YCbCr...: alpha is dropped, colour goes through luma
            bits = 1 if mode == "1" else 8
            rgb = img.convert("RGB")
            small = rgb.reduce(f) if f > 1 else rgb
            colour = colourfulness(np.asarray(small))
            x = _block_mean(np.asarray(rgb.convert("L")), f) / 255.0
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image is too large to decode safely: {_short(e)}", too_large=True,
                         code="too_many_pixels") from e
    except Exception as e:
        raise ImageError(f"truncated or corrupt {fmt.upper()} data: {_short(e)}", code="corrupt") from e
    return DecodedImage(_finish(x), width, height, fmt, bits, None, colour)


def _own_window(x: np.ndarray, lo: float, hi: float, bit_range: float) -> np.ndarray:
    """Values without a display mapping -> [0, 1] by their own min..max over every pixel (constant: by the
    bit range)."""
    return _window(x, lo, hi) if hi > lo else x / bit_range


# ------------------------------------------------------------------------------------------------- DICOM


def _decode_dicom(data: bytes, force: bool, max_pixels: int, min_resolution: int, max_side: int | None
                  ) -> DecodedImage:
    try:
        ds = pydicom.dcmread(BytesIO(data), force=force)
    except Exception as e:
        raise ImageError(f"unreadable DICOM file: {_short(e)}", code="corrupt") from e
    if force and "PixelData" not in ds:  # forced reads accept almost any bytes: don't call them DICOM
        raise ImageError(f"{NOT_AN_IMAGE} (named .dcm, but has no DICOM header or pixel data)", code="not_an_image")
    try:
        return _dicom_image(ds, max_pixels, min_resolution, max_side)
    except ImageError:
        raise
    except Exception as e:  # malformed attribute values (non-numeric Rows, bad LUT...)
        raise ImageError(f"invalid DICOM file: {_short(e)}", code="corrupt") from e


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


def _dicom_image(ds: pydicom.Dataset, max_pixels: int, min_resolution: int, max_side: int | None) -> DecodedImage:
    if "PixelData" not in ds:
        raise ImageError("DICOM file has no pixel data", code="dicom_no_pixels")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise ImageError(f"multi-frame DICOM ({frames} frames) is not supported: export a single frame",
                         code="multi_frame")
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if not rows or not cols:
        raise ImageError("DICOM file has no image size (Rows/Columns missing)", code="corrupt")
    _check_size(cols, rows, max_pixels, min_resolution)
    pi = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip().upper()
    if pi not in (*_GRAY_PI, "RGB") and not pi.startswith("YBR"):
        raise ImageError(f"DICOM photometric interpretation {pi} is not supported: export as grayscale",
                         code="dicom_unsupported")

    ts = _transfer_syntax(ds)
    try:
        arr = ds.pixel_array  # pydicom 3 returns YBR_* as RGB by default
    except Exception as e:
        if not ts.is_transfer_syntax or ts.is_compressed:
            raise ImageError(
                f"DICOM transfer syntax {ts.name} ({ts}) cannot be decoded here: {_short(e)}; "
                "convert to uncompressed (explicit VR little endian)", code="dicom_unsupported"
            ) from e
        raise ImageError(f"corrupt DICOM pixel data: {_short(e)}", code="corrupt") from e

    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
    f = reduction_factor(cols, rows, max_side)
    colour = 0.0
    if arr.ndim == 3:  # colour: no modality/VOI LUTs apply; scale by the stored range, then luma
        rgb = _block_mean(arr, f) / (2**bits - 1)
        colour = colourfulness(rgb * 255.0)
        x = rgb @ _LUMA
    elif arr.ndim == 2:
        x = _dicom_gray(arr, ds, bits, f)
        if pi == "MONOCHROME1":  # 0 = white: flip to the MONOCHROME2 convention used everywhere else
            x = 1.0 - x
    else:
        raise ImageError(f"DICOM pixel data has unexpected shape {arr.shape}", code="corrupt")
    view = str(ds.get("ViewPosition") or "").strip().upper() or None
    return DecodedImage(_finish(x), cols, rows, "dicom", bits, view, colour)


def _dicom_gray(arr: np.ndarray, ds: pydicom.Dataset, bits: int, f: int) -> np.ndarray:
    """Stored values -> modality values (Rescale/LUT) -> [0, 1] via the VOI LUT, the window, or the values' own
    min..max (what viewers do without a VOI), reduced by `f` after the mapping (see _block_mean)."""
    def modality(a):
        return np.asarray(apply_modality_lut(a, ds), dtype=np.float64)

    if ds.get("VOILUTSequence"):
        n, first = ds.VOILUTSequence[0].LUTDescriptor[:2]
        n = n or 65536
        outputs = apply_voi_lut(np.arange(first, first + n), ds, index=0)  # every LUT entry
        lo, hi = float(outputs.min()), float(outputs.max())
        if hi <= lo:
            return np.zeros((arr.shape[0] // f, arr.shape[1] // f))

        def voi(a):
            m = np.clip(np.rint(modality(a)), first, first + n - 1).astype(np.int64)
            return _window(np.asarray(apply_voi_lut(m, ds, index=0), dtype=np.float64), lo, hi)
        return _block_mean(arr, f, voi)
    if "WindowCenter" in ds and "WindowWidth" in ds and _first(ds.WindowWidth) > 0:
        c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
        if str(ds.get("VOILUTFunction") or "LINEAR").upper() == "SIGMOID":
            return _block_mean(arr, f, lambda a: 1.0 / (1.0 + np.exp(-4.0 * (modality(a) - c) / w)))
        return _block_mean(arr, f, lambda a: np.clip(_window(modality(a), c - w / 2, c + w / 2), 0.0, 1.0))
    x = _block_mean(arr, f, modality)
    lo, hi = _min_max(arr, modality)  # over every pixel, not over the block means
    if hi > lo:
        return _window(x, lo, hi)
    signed = int(ds.get("PixelRepresentation") or 0) == 1  # constant image: its level within the bit range
    lo_s, hi_s = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    has_lut = bool(ds.get("ModalityLUTSequence")) and bits <= 16
    r = apply_modality_lut(np.arange(lo_s, hi_s + 1) if has_lut else np.array([lo_s, hi_s]), ds)
    lo, hi = float(np.min(r)), float(np.max(r))
    return _window(x, lo, hi) if hi > lo else np.zeros(x.shape)
