"""Reading multipart uploads into memory only, with a byte cap enforced while the body streams in.

Starlette's own form parser spools files above 1 MB to a temporary file on disk, and X-ray images must never
touch the disk, so uploads are parsed here with python-multipart's streaming parser into bytes in memory.
A Content-Length above the cap is refused before a byte is read; a body that grows past it mid-stream too.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from inference_api.errors import InputError
from inference_api.limits import Reservation

# Part content types accepted for an image. Browsers and curl send image/* or octet-stream; DICOM is
# application/dicom. Anything else (text, JSON, PDF, video...) is refused with 415 before decoding.
_ACCEPTED_PREFIXES = ("image/", "application/dicom", "application/octet-stream", "application/x-dicom")
_MAX_PARTS = 256
_MAX_HEADER_BYTES = 16 * 1024  # one part's headers (a file name of a few thousand characters still fits)


@dataclass
class UploadedFile:
    field: str
    filename: str | None
    content_type: str | None
    data: bytes


@dataclass
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)


def _too_large(limit: int) -> InputError:
    return InputError(413, f"upload exceeds the limit of {limit:,} bytes: send a smaller image "
                           f"(or raise FEDXRAY_MAX_UPLOAD_BYTES on the server)", "upload_too_large")


class _Refused(Exception):
    """Raised inside the parser's callbacks; carries the InputError out past python-multipart."""

    def __init__(self, error: InputError):
        self.error = error


def check_content_type(content_type: str | None) -> None:
    """415 unless the part's declared type is an image, DICOM, octet-stream or absent."""
    if content_type and not content_type.lower().startswith(_ACCEPTED_PREFIXES):
        raise InputError(415, f"unsupported content type {content_type!r}: send a PNG, JPEG or DICOM image "
                              f"(image/png, image/jpeg, application/dicom or application/octet-stream)",
                         "unsupported_media_type")


async def read_files(request: Request, *, max_bytes: int, field_names: tuple[str, ...] = ("file", "files"),
                     reservation: Reservation | None = None) -> list[UploadedFile]:
    """The file parts of a multipart/form-data request, in order, held in memory. Raises 4xx InputErrors.

    With a `reservation` (limits.Budget), every byte held is counted against the server's upload budget
    while it streams in (Content-Length is reserved up front), so many big uploads at once get 503.
    """
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise InputError(415, "expected a multipart/form-data upload with the image in a field named 'file' "
                              f"(e.g. curl -F file=@xray.png); got content type "
                              f"{request.headers.get('content-type') or 'none'!r}", "unsupported_media_type")
    length = request.headers.get("content-length")
    declared = int(length) if length is not None and length.isdigit() else None
    if declared is not None and declared > max_bytes:
        raise _too_large(max_bytes)
    if reservation is not None and declared:
        await reservation.grow(declared)

    parts: list[_Part] = []
    header = {"field": b"", "value": b""}
    received = 0

    def on_part_begin():
        if len(parts) >= _MAX_PARTS:
            raise _Refused(InputError(413, f"too many parts in one request (limit {_MAX_PARTS})", "too_many_files"))
        parts.append(_Part())

    def header_bytes(field_or_value: str, data, start, end):
        header[field_or_value] += data[start:end]
        if len(header["field"]) + len(header["value"]) > _MAX_HEADER_BYTES:
            raise _Refused(InputError(400, f"a part header (e.g. the file name) is longer than "
                                           f"{_MAX_HEADER_BYTES:,} bytes: rename the file", "bad_request"))

    def on_header_field(data, start, end):
        header_bytes("field", data, start, end)

    def on_header_value(data, start, end):
        header_bytes("value", data, start, end)

    def on_header_end():
        parts[-1].headers[header["field"].decode("latin-1").strip().lower()] = header["value"].decode("latin-1")
        header["field"], header["value"] = b"", b""

    def on_part_data(data, start, end):
        parts[-1].chunks.append(bytes(data[start:end]))

    parser = MultipartParser(params[b"boundary"], {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data})
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise _too_large(max_bytes)
            if reservation is not None and received > (declared or 0):
                await reservation.grow(len(chunk))
            parser.write(chunk)
        parser.finalize()
    except InputError:
        raise
    except _Refused as e:
        raise e.error from None
    except Exception as e:  # malformed multipart body, client disconnect
        if isinstance(e.__context__, _Refused):
            raise e.__context__.error from None
        raise InputError(400, f"malformed multipart body ({type(e).__name__}): re-send the upload") from None

    files = []
    for p in parts:
        disp, opts = parse_options_header(p.headers.get("content-disposition", ""))
        name = opts.get(b"name", b"").decode("utf-8", "replace")
        if name not in field_names:
            continue  # other form fields are ignored: options travel as query parameters
        filename = opts.get(b"filename")
        if filename is None:  # a text field, not a file: curl -F 'file=<x.png' or a form value
            raise InputError(400, f"form field {name!r} holds text, not a file: send the image as a file part "
                                  f"(e.g. curl -F {name}=@xray.png)", "bad_request")
        files.append(UploadedFile(name, filename.decode("utf-8", "replace"), p.headers.get("content-type"),
                                  b"".join(p.chunks)))
        p.chunks.clear()
    if not files:
        raise InputError(400, f"no image in the upload: put the file in a form field named "
                              f"{' or '.join(repr(f) for f in field_names)} (e.g. curl -F file=@xray.png)")
    return files
