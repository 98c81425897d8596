"""common.imageio: every fixture is generated in memory (benchmarks.image_files: Pillow / pydicom), every error
asserts on its message."""
from __future__ import annotations

from io import BytesIO

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000, JPEGBaseline8Bit

from benchmarks.image_files import compressed_dicom, dicom_bytes, dicom_dataset, patch_png_size, pil_bytes
from common.errors import ImageError
from common.imageio import (
    DEFAULT_MAX_PIXELS,
    NOT_AN_IMAGE,
    DecodedImage,
    decode_image,
    is_dicom,
    probe_image,
    read_image,
)

RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------------------- builders


def png16(arr: np.ndarray) -> bytes:
    return pil_bytes(Image.fromarray(arr.astype(np.uint16)))


def raises(data: bytes, *fragments: str, **kw) -> ImageError:
    with pytest.raises(ImageError) as info:
        decode_image(data, **kw)
    for fragment in fragments:
        assert fragment in info.value.reason, info.value.reason
    return info.value


# ------------------------------------------------------------------------------------ Pillow formats


def test_png_8bit_values_exact():
    arr = np.array([[0, 51, 102], [153, 204, 255]], dtype=np.uint8)
    d = decode_image(pil_bytes(Image.fromarray(arr)))
    assert isinstance(d, DecodedImage)
    assert (d.format, d.bit_depth, d.width, d.height, d.view) == ("png", 8, 3, 2, None)
    assert d.pixels.dtype == np.float32 and d.pixels.shape == (2, 3)
    np.testing.assert_allclose(d.pixels, arr / 255.0, atol=1e-7)


def test_png_16bit_divided_by_65535():
    arr = np.array([[0, 1, 4095], [32768, 65534, 65535]], dtype=np.uint16)
    d = decode_image(png16(arr))
    assert (d.format, d.bit_depth) == ("png", 16)
    np.testing.assert_array_equal(d.pixels, (arr / 65535.0).astype(np.float32))


def test_jpeg_gray_and_rgb():
    gradient = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1))
    d = decode_image(pil_bytes(Image.fromarray(gradient), "JPEG", quality=100))
    assert (d.format, d.bit_depth, d.pixels.shape) == ("jpeg", 8, (64, 64))
    np.testing.assert_allclose(d.pixels, gradient / 255.0, atol=3 / 255)

    red = Image.new("RGB", (64, 48), (255, 0, 0))
    d = decode_image(pil_bytes(red, "JPEG", quality=100))
    assert (d.width, d.height, d.pixels.shape) == (64, 48, (48, 64))
    np.testing.assert_allclose(d.pixels, 0.299, atol=0.02)  # luma of pure red


def test_jpeg_exif_orientation_applied():
    img = Image.new("L", (40, 20), 128)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    d = decode_image(pil_bytes(img, "JPEG", exif=exif))
    assert (d.width, d.height) == (20, 40)


def test_rgba_ignores_alpha():
    img = Image.new("RGBA", (4, 4), (0, 0, 255, 0))  # fully transparent blue: alpha must not darken it
    d = decode_image(pil_bytes(img))
    np.testing.assert_allclose(d.pixels, 29 / 255, atol=1e-6)  # 0.114 * 255 = 29.07 -> 29


def test_palette_png():
    img = Image.new("P", (4, 2))
    img.putpalette([0, 0, 0, 255, 255, 255, 0, 255, 0] + [0] * (256 * 3 - 9))
    img.putdata([0, 1, 2, 0, 1, 2, 0, 1])
    d = decode_image(pil_bytes(img))
    expected = np.array([[0, 255, 150, 0], [255, 150, 0, 255]]) / 255  # 0.587 * 255 = 149.7 -> 150
    np.testing.assert_allclose(d.pixels, expected, atol=1e-6)
    assert d.bit_depth == 8


def test_other_pillow_formats_bmp_and_float_tiff():
    arr = np.array([[10, 20], [30, 40]], dtype=np.uint8)
    d = decode_image(pil_bytes(Image.fromarray(arr), "BMP"))
    assert d.format == "bmp"
    np.testing.assert_allclose(d.pixels, arr / 255, atol=1e-7)

    f = np.array([[-0.5, 0.25], [0.75, 2.0]], dtype=np.float32)
    d = decode_image(pil_bytes(Image.fromarray(f, mode="F"), "TIFF"))
    assert d.format == "tiff"
    np.testing.assert_allclose(d.pixels, [[0, 0.25], [0.75, 1]])


# ------------------------------------------------------------------------------------------------ DICOM


def test_is_dicom():
    assert is_dicom(dicom_bytes(np.zeros((2, 2), np.uint16)))
    assert not is_dicom(png16(np.zeros((2, 2))))
    assert not is_dicom(b"")


def test_dicom_monochrome2_16bit_matches_png():
    arr = RNG.integers(0, 65536, size=(32, 48), dtype=np.uint16)
    d_dcm, d_png = decode_image(dicom_bytes(arr)), decode_image(png16(arr))
    assert (d_dcm.format, d_dcm.bit_depth, d_dcm.width, d_dcm.height) == ("dicom", 16, 48, 32)
    assert d_dcm.pixels.dtype == np.float32
    assert np.allclose(d_dcm.pixels, d_png.pixels, atol=1e-6)


def test_dicom_monochrome1_is_inverted():
    arr = RNG.integers(0, 65536, size=(16, 16), dtype=np.uint16)
    m1 = decode_image(dicom_bytes(arr, pi="MONOCHROME1")).pixels
    m2 = decode_image(dicom_bytes(arr, pi="MONOCHROME2")).pixels
    assert np.allclose(m1, 1.0 - m2, atol=1e-6)


def test_dicom_without_voi_windowed_by_its_own_values():
    arr = np.array([[100, 1100], [2100, 3100]], dtype=np.uint16)  # 12-bit data using part of the range
    d = decode_image(dicom_bytes(arr, bits_stored=12))
    assert d.bit_depth == 12
    np.testing.assert_allclose(d.pixels, (arr - 100) / 3000.0, atol=1e-6)  # min..max, not 0..4095


def test_dicom_rescale_slope_with_halved_pixels_decodes_like_the_original():
    """The issue's case: the same picture stored halved with RescaleSlope=2 (no VOI) must not be darker."""
    arr = (RNG.integers(200, 1800, size=(40, 56)) * 2).astype(np.uint16)  # even values: halving is exact
    original = decode_image(dicom_bytes(arr, bits_stored=12)).pixels
    halved = decode_image(dicom_bytes(arr // 2, bits_stored=12, RescaleSlope=2, RescaleIntercept=0)).pixels
    np.testing.assert_allclose(halved, original, atol=1e-6)
    assert original.max() == pytest.approx(1.0) and original.min() == pytest.approx(0.0)


def test_16bit_png_and_dicom_of_partial_range_values_agree():
    arr = RNG.integers(5000, 30000, size=(32, 48), dtype=np.uint16)
    np.testing.assert_allclose(decode_image(png16(arr)).pixels, decode_image(dicom_bytes(arr)).pixels, atol=1e-6)


def test_constant_dicom_keeps_its_level_in_the_bit_range():
    d = decode_image(dicom_bytes(np.full((8, 8), 1000, np.uint16), bits_stored=12))
    np.testing.assert_allclose(d.pixels, 1000 / 4095, atol=1e-6)


def test_dicom_rescale_then_window():
    arr = np.array([[0, 1000, 1500, 2000], [2500, 3000, 4000, 100]], dtype=np.uint16)
    # modality = 2 * stored - 1000: [-1000, 1000, 2000, 3000, 4000, 5000, 7000, -800]
    # window [2000 - 2000, 2000 + 2000] = [0, 4000] -> [0, .25, .5, .75, 1, 1, 1, 0]
    d = decode_image(
        dicom_bytes(arr, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=2000, WindowWidth=4000)
    )
    np.testing.assert_allclose(d.pixels, [[0, 0.25, 0.5, 0.75], [1, 1, 1, 0]], atol=1e-6)


def test_dicom_multi_valued_window_uses_first():
    arr = np.array([[100, 150], [200, 300]], dtype=np.uint16)
    d = decode_image(dicom_bytes(arr, WindowCenter=[200, 9000], WindowWidth=[200, 10]))
    np.testing.assert_allclose(d.pixels, [[0, 0.25], [0.5, 1]], atol=1e-6)


def test_dicom_rescale_intercept_without_window_changes_nothing():
    arr = np.array([[10, 2048], [4000, 1000]], dtype=np.uint16)
    d = decode_image(dicom_bytes(arr, bits_stored=12, RescaleSlope=1, RescaleIntercept=-1024))
    np.testing.assert_allclose(d.pixels, (arr - 10) / 3990.0, atol=1e-6)  # the window moves with the values


def test_dicom_voi_lut_sequence():
    arr = np.array([[0, 1], [2, 3]], dtype=np.uint16)
    item = Dataset()
    item.add_new(0x00283002, "US", [4, 0, 16])  # LUTDescriptor: 4 entries, first maps 0, 16 bits
    item.add_new(0x00283006, "US", [100, 200, 300, 500])  # LUTData
    d = decode_image(dicom_bytes(arr, VOILUTSequence=[item]))
    np.testing.assert_allclose(d.pixels, [[0, 0.25], [0.5, 1]], atol=1e-6)  # scaled by LUT min/max


def test_dicom_signed_pixels():
    arr = np.array([[-32768, -1], [0, 32767]], dtype=np.int16)  # spans the whole range: min..max = bit range
    d = decode_image(dicom_bytes(arr, signed=True))
    np.testing.assert_allclose(d.pixels, (arr.astype(float) + 32768) / 65535, atol=1e-6)


def test_dicom_rgb_converted_to_gray():
    arr = np.zeros((4, 4, 3), dtype=np.uint8)
    arr[..., 1] = 255
    d = decode_image(dicom_bytes(arr, pi="RGB"))
    assert (d.pixels.shape, d.bit_depth) == ((4, 4), 8)
    np.testing.assert_allclose(d.pixels, 0.587, atol=1e-6)


def test_dicom_ybr_converted_and_palette_rejected():
    arr = np.zeros((4, 4, 3), dtype=np.uint8)
    arr[..., 0], arr[..., 1:] = 200, 128  # Y = 200, neutral chroma -> gray 200
    np.testing.assert_allclose(decode_image(dicom_bytes(arr, pi="YBR_FULL")).pixels, 200 / 255, atol=1e-6)
    raises(dicom_bytes(arr[..., 0], pi="PALETTE COLOR"), "photometric interpretation PALETTE COLOR is not supported")


def test_dicom_view_position():
    arr = np.zeros((4, 4), dtype=np.uint16)
    assert decode_image(dicom_bytes(arr, ViewPosition="PA")).view == "PA"
    assert decode_image(dicom_bytes(arr, ViewPosition="LATERAL ")).view == "LATERAL"
    assert decode_image(dicom_bytes(arr)).view is None


def test_dicom_without_preamble_only_when_named_dcm():
    ds = dicom_dataset(np.full((4, 4), 65535, dtype=np.uint16))
    buf = BytesIO()
    ds.save_as(buf, implicit_vr=True, little_endian=True)  # bare data set: no preamble, no "DICM"
    data = buf.getvalue()
    assert not is_dicom(data)
    np.testing.assert_allclose(decode_image(data, name="IMG001.DCM").pixels, 1.0)
    raises(data, "not a PNG, JPEG or DICOM image")


def test_dicom_multi_frame_rejected():
    data = dicom_bytes(np.zeros((3, 8, 8), dtype=np.uint16), NumberOfFrames=3)
    err = raises(data, "multi-frame DICOM (3 frames) is not supported", "export a single frame")
    assert "Doe" not in str(err)  # never echo patient data


def test_dicom_without_pixel_data_rejected():
    ds = dicom_dataset(np.zeros((4, 4), dtype=np.uint16))
    del ds.PixelData
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = BytesIO()
    FileDataset(None, ds, file_meta=meta, preamble=b"\0" * 128).save_as(buf, enforce_file_format=True)
    raises(buf.getvalue(), "DICOM file has no pixel data")


@pytest.mark.parametrize("ts", [JPEG2000, JPEGBaseline8Bit])
def test_dicom_compressed_garbage_names_transfer_syntax(ts):
    err = raises(compressed_dicom(ts, np.uint8), f"DICOM transfer syntax {ts.name} ({ts}) cannot be decoded here", "uncompressed")
    assert "Doe" not in str(err)


def test_dicom_truncated_pixel_data_rejected():
    data = dicom_bytes(np.zeros((64, 64), dtype=np.uint16))
    raises(data[: len(data) - 4000], "DICOM")


def test_dicom_too_small_and_too_large():
    data = dicom_bytes(np.zeros((20, 30), dtype=np.uint16))
    err = raises(data, "resolution 30x20 px is below the minimum of 64 px", min_resolution=64)
    assert not err.too_large
    err = raises(data, "image has 30x20 = 600 pixels, above the limit of 100", max_pixels=100)
    assert err.too_large


# ---------------------------------------------------------------------------------------- bad inputs


def test_truncated_png_and_jpeg_rejected():
    noise = Image.fromarray(RNG.integers(0, 256, size=(128, 128), dtype=np.uint8))
    png = pil_bytes(noise)
    raises(png[: len(png) // 2], "truncated or corrupt PNG data")
    jpg = pil_bytes(noise, "JPEG")
    raises(jpg[: len(jpg) // 2], "truncated or corrupt JPEG data")
    raises(png[:20], "truncated or corrupt PNG data")  # cut inside the header


def test_random_bytes_and_text_rejected(tmp_path):
    raises(RNG.bytes(1000), "not a PNG, JPEG or DICOM image")
    raises(RNG.bytes(1000), "not a PNG, JPEG or DICOM image", name="scan.dcm")
    p = tmp_path / "notes.txt"
    p.write_text("patient looked fine\n" * 20)
    with pytest.raises(ImageError) as info:
        read_image(p)
    assert info.value.reason == NOT_AN_IMAGE and info.value.path == str(p) and info.value.code == "not_an_image"
    assert str(p) in str(info.value)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError) as info:
        read_image(empty)
    assert info.value.reason == "empty file (0 bytes)" and info.value.path == str(empty)
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageError) as info:
        read_image(missing)
    assert info.value.reason == "file not found" and info.value.path == str(missing)
    raises(b"", "empty file (0 bytes)")


def test_read_image_ok_and_error_carries_path(tmp_path):
    p = tmp_path / "a.png"
    p.write_bytes(pil_bytes(Image.new("L", (20, 30), 255)))
    np.testing.assert_allclose(read_image(p).pixels, 1.0)
    with pytest.raises(ImageError) as info:
        read_image(p, min_resolution=64)
    assert info.value.reason == "resolution 20x30 px is below the minimum of 64 px (shorter side)"
    assert info.value.path == str(p) and not info.value.too_large


def test_header_claims_huge_size_is_too_large():
    tiny = pil_bytes(Image.new("L", (1, 1)))
    assert decode_image(tiny).pixels.shape == (1, 1)
    # above our limit but below Pillow's own bomb threshold: our message, from the header alone
    err = raises(patch_png_size(tiny, 8000, 8000), "image has 8000x8000 = 64,000,000 pixels", "above the limit")
    assert err.too_large and DEFAULT_MAX_PIXELS == 60_000_000
    # far above Pillow's threshold: its DecompressionBombError becomes too_large as well
    err = raises(patch_png_size(tiny, 100_000, 100_000), "too large")
    assert err.too_large


def test_max_pixels_on_real_image():
    err = raises(pil_bytes(Image.new("L", (100, 100))), "above the limit of 5,000", max_pixels=5000)
    assert err.too_large


# ------------------------------------------------------------------------------ large images, memory


def test_large_png_reduced_by_block_mean_keeps_original_size():
    arr = RNG.integers(0, 256, size=(3000, 5000), dtype=np.uint8)  # longer side 5000 -> factor 3
    d = decode_image(pil_bytes(Image.fromarray(arr)), max_side=2048)
    assert (d.width, d.height) == (5000, 3000) and d.pixels.shape == (1000, 1666)
    expected = arr[:3000, :4998].reshape(1000, 3, 1666, 3).mean(axis=(1, 3)) / 255
    np.testing.assert_allclose(d.pixels, expected, atol=1e-6)
    assert d.scale == pytest.approx(1666 / 5000)
    assert decode_image(pil_bytes(Image.fromarray(arr[:64, :64])), max_side=2048).pixels.shape == (64, 64)


def test_large_jpeg_decoded_at_a_dct_scale():
    y, x = np.mgrid[0:4200, 0:4100]
    arr = ((np.sin(x / 300) * np.cos(y / 400) + 1) * 120).astype(np.uint8)
    d = decode_image(pil_bytes(Image.fromarray(arr), "JPEG", quality=95), max_side=2048)
    assert (d.width, d.height) == (4100, 4200) and max(d.pixels.shape) <= 2048
    full = decode_image(pil_bytes(Image.fromarray(arr), "JPEG", quality=95), max_side=None)
    assert full.pixels.shape == (4200, 4100)
    h, w = d.pixels.shape
    f = 4200 // h
    coarse = full.pixels[:h * f, :w * f].reshape(h, f, w, f).mean(axis=(1, 3))
    assert np.abs(coarse - d.pixels).mean() < 2 / 255  # libjpeg's scaling ~ a block mean of the full decode


def test_large_dicom_and_16bit_png_reduce_alike():
    arr = RNG.integers(1000, 20000, size=(2100, 2500), dtype=np.uint16)
    a = decode_image(png16(arr), max_side=2048)
    b = decode_image(dicom_bytes(arr, RescaleSlope=2, RescaleIntercept=-7), max_side=2048)
    assert a.pixels.shape == b.pixels.shape == (1050, 1250)
    np.testing.assert_allclose(a.pixels, b.pixels, atol=1e-6)


def test_probe_reads_the_header_only():
    h = probe_image(png16(np.zeros((30, 40), np.uint16)))
    assert (h.width, h.height, h.format, h.bytes_per_pixel, h.pixels) == (40, 30, "png", 2, 1200)
    h = probe_image(dicom_bytes(np.zeros((20, 10), np.uint16)))
    assert (h.width, h.height, h.format, h.bytes_per_pixel) == (10, 20, "dicom", 2)
    err = pytest.raises(ImageError, probe_image, patch_png_size(pil_bytes(Image.new("L", (1, 1))), 9000, 9000))
    assert err.value.too_large and err.value.code == "too_many_pixels"


# ------------------------------------------------------------------------ format decisions, colour


def _frames(fmt: str, n: int, **kw) -> bytes:
    return pil_bytes([Image.fromarray(np.full((32, 32), 40 * i, np.uint8)) for i in range(n)], fmt, **kw)


@pytest.mark.parametrize("fmt, kw, name", [("TIFF", {}, "tiff"), ("BMP", {}, "bmp"), ("WEBP", {"lossless": True}, "webp"),
                                           ("GIF", {}, "gif")])
def test_single_frame_formats_accepted(fmt, kw, name):
    d = decode_image(_frames(fmt, 1, **kw))
    assert d.format == name and d.pixels.shape == (32, 32)
    np.testing.assert_allclose(d.pixels, 0, atol=1 / 255)


def test_16bit_tiff_accepted_like_16bit_png():
    arr = RNG.integers(100, 4000, size=(16, 24), dtype=np.uint16)
    np.testing.assert_allclose(decode_image(pil_bytes(Image.fromarray(arr), "TIFF")).pixels,
                               decode_image(png16(arr)).pixels, atol=1e-6)


@pytest.mark.parametrize("fmt, kw", [("GIF", {}), ("PNG", {}), ("TIFF", {}), ("WEBP", {"lossless": True})])
def test_multi_frame_files_refused(fmt, kw):
    """Animated GIF, APNG, multi-page TIFF and animated WebP: which frame is the X-ray is not ours to guess."""
    err = raises(_frames(fmt, 3, **kw), "3 frames", "not supported")
    assert err.code == "multi_frame"
    assert pytest.raises(ImageError, probe_image, _frames(fmt, 3, **kw)).value.code == "multi_frame"


@pytest.mark.parametrize("fmt", ["PPM", "ICO", "PCX"])
def test_other_pillow_formats_refused(fmt):
    img = Image.new("L" if fmt != "ICO" else "RGB", (32, 32))
    assert raises(pil_bytes(img, fmt), "not a PNG, JPEG or DICOM").code == "not_an_image"


def test_colourfulness_measured_before_the_luma_conversion():
    gray = Image.fromarray(RNG.integers(0, 256, size=(40, 40), dtype=np.uint8)).convert("RGB")
    assert decode_image(pil_bytes(gray)).colourfulness == pytest.approx(0, abs=1e-9)
    assert decode_image(pil_bytes(Image.fromarray(RNG.integers(0, 256, (40, 40), np.uint8)))).colourfulness == 0
    grad = np.zeros((40, 40, 3), np.uint8)
    grad[..., 0] = np.linspace(0, 255, 40)[None]
    grad[..., 2] = np.linspace(255, 0, 40)[:, None]
    assert decode_image(pil_bytes(Image.fromarray(grad))).colourfulness > 50
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 255
    assert decode_image(dicom_bytes(rgb, pi="RGB")).colourfulness > 50


def test_undecodable_jpeg2000_logs_no_traceback(caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    assert raises(compressed_dicom(), "JPEG 2000").code == "dicom_unsupported"
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
