"""Reading multipart uploads into memory only, with a byte cap enforced while the body streams in.

Starlette's own form parser spools files above 1 MB to a temporary file on disk, and X-ray images must never
touch the disk, so uploads are parsed here with python-multipart's streaming parser into bytes in memory.
A Content-Length above the cap is refused before a byte is read; a body that grows past it mid-stream too.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import HTTPException, Request
from python_multipart.multipart import MultipartParser, parse_options_header

# Part content types accepted for an image. Browsers and curl send image/* or octet-stream; DICOM is
# application/dicom. Anything else (text, JSON, PDF, video...) is refused with 415 before decoding.
_ACCEPTED_PREFIXES = ("image/", "application/dicom", "application/octet-stream", "application/x-dicom")
_MAX_PARTS = 256


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


def _too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"upload exceeds the limit of {limit:,} bytes: send a smaller image "
                              f"(or raise FEDXRAY_MAX_UPLOAD_BYTES on the server)")


def check_content_type(content_type: str | None) -> None:
    """415 unless the part's declared type is an image, DICOM, octet-stream or absent."""
    if content_type and not content_type.lower().startswith(_ACCEPTED_PREFIXES):
        raise HTTPException(415, f"unsupported content type {content_type!r}: send a PNG, JPEG or DICOM image "
                                 f"(image/png, image/jpeg, application/dicom or application/octet-stream)")


async def read_files(request: Request, *, max_bytes: int, field_names: tuple[str, ...] = ("file", "files")
                     ) -> list[UploadedFile]:
    """The file parts of a multipart/form-data request, in order, held in memory. Raises 4xx HTTPExceptions."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise HTTPException(415, "expected a multipart/form-data upload with the image in a field named 'file' "
                                 f"(e.g. curl -F file=@xray.png); got content type "
                                 f"{request.headers.get('content-type') or 'none'!r}")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise _too_large(max_bytes)

    parts: list[_Part] = []
    header = {"field": b"", "value": b""}
    received = 0

    def on_part_begin():
        if len(parts) >= _MAX_PARTS:
            raise HTTPException(413, f"too many parts in one request (limit {_MAX_PARTS})")
        parts.append(_Part())

    def on_header_field(data, start, end):
        header["field"] += data[start:end]

    def on_header_value(data, start, end):
        header["value"] += data[start:end]

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
            parser.write(chunk)
        parser.finalize()
    except HTTPException:
        raise
    except Exception as e:  # malformed multipart body, client disconnect
        raise HTTPException(400, f"malformed multipart body ({type(e).__name__}): re-send the upload") from None

    files = []
    for p in parts:
        disp, opts = parse_options_header(p.headers.get("content-disposition", ""))
        name = opts.get(b"name", b"").decode("utf-8", "replace")
        if name not in field_names:
            continue  # other form fields are ignored: options travel as query parameters
        filename = opts.get(b"filename")
        files.append(UploadedFile(name, filename.decode("utf-8", "replace") if filename is not None else None,
                                  p.headers.get("content-type"), b"".join(p.chunks)))
    if not files:
        raise HTTPException(400, f"no image in the upload: put the file in a form field named "
                                 f"{' or '.join(repr(f) for f in field_names)} (e.g. curl -F file=@xray.png)")
    return files
