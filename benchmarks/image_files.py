"""Image files built in memory, well-formed and hostile, for the API's benchmarks and the tests (which import
them from here: benchmarks may not import tests): Pillow's formats, PNG, JPEG, DICOM data sets (uncompressed,
or with a compressed transfer syntax and a codestream that is garbage), and a PNG whose header lies about its
size. Every value is synthetic."""
from __future__ import annotations

import struct
import zlib
from io import BytesIO

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, JPEG2000, generate_uid


def pil_bytes(img: Image.Image | list[Image.Image], fmt: str = "PNG", **kw) -> bytes:
    """The image encoded by Pillow as `fmt`; a list of images is saved as that many frames."""
    frames = img if isinstance(img, list) else [img]
    buf = BytesIO()
    if len(frames) > 1:
        kw = {"save_all": True, "append_images": frames[1:], **kw}
    frames[0].save(buf, fmt, **kw)
    return buf.getvalue()


def png(arr: np.ndarray, bits: int = 8, mode: str | None = None) -> bytes:
    """PNG bytes of a [0, 1] image: 8-bit L, 16-bit I;16, or converted to `mode` (RGBA, P...)."""
    if bits == 16:
        img = Image.fromarray((arr * 65535).round().astype(np.uint16))
    else:
        img = Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8), mode="L")
    return pil_bytes(img.convert(mode) if mode else img)


def jpeg(arr: np.ndarray, quality: int = 95) -> bytes:
    """JPEG bytes of a [0, 1] grayscale image."""
    return pil_bytes(Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8), mode="L"), "JPEG",
                     quality=quality)


def dicom_dataset(arr: np.ndarray, *, pi="MONOCHROME2", bits_stored=None, signed=False, **attrs) -> Dataset:
    """A minimal DX data set holding `arr` (H, W), (frames, H, W) or (H, W, 3) uncompressed."""
    ds = Dataset()
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.PatientName = "Doe^Jane"
    color = arr.ndim == 3 and arr.shape[-1] == 3
    ds.Rows, ds.Columns = arr.shape[-3:-1] if color else arr.shape[-2:]
    ds.SamplesPerPixel = 3 if color else 1
    if color:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = pi
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def dicom_bytes(arr: np.ndarray, *, ts=ExplicitVRLittleEndian, **kw) -> bytes:
    """A DICOM file (preamble, file meta) of dicom_dataset(arr, **kw) in transfer syntax `ts`."""
    ds = dicom_dataset(arr, **kw)
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ts
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    fds = FileDataset(None, ds, file_meta=meta, preamble=b"\0" * 128)
    buf = BytesIO()
    fds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def compressed_dicom(ts=JPEG2000, dtype=np.uint16, size: int = 8) -> bytes:
    """A DICOM file with a compressed transfer syntax whose codestream cannot be decoded (garbage)."""
    ds = dicom_dataset(np.zeros((size, size), dtype=dtype))
    ds.PixelData = encapsulate([b"\x00garbage, not a codestream" * 4])
    ds["PixelData"].VR = "OB"
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ts
    buf = BytesIO()
    FileDataset(None, ds, file_meta=meta, preamble=b"\0" * 128).save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def patch_png_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite IHDR width/height (bytes 16..24) and its CRC: a header that lies about the size."""
    ihdr = data[12:16] + struct.pack(">II", width, height) + data[24:29]
    return data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]
