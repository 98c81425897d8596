"""What the schema says beyond what the routes declare: the multipart bodies, the error answers, and what depends
on the served bundle and settings (finding names as enums, the batch's file limit)."""
from __future__ import annotations

import re

from common.bundle import Bundle, read_card
from inference_api import schemas
from inference_api.settings import Settings

IMAGE_FIELD = {"type": "string", "format": "binary",
               "description": "Chest X-ray: PNG (8/16-bit, gray, RGB(A), palette), JPEG, DICOM (MONOCHROME1/2, "
                              "uncompressed or a codec installed here), TIFF, BMP, WebP or GIF; one frame only"}
ERRORS = {
    400: {"model": schemas.ErrorResponse, "description": "Malformed multipart body, no file part, a text value "
                                                         "where a file belongs, an over-long part header"},
    401: {"model": schemas.ErrorResponse, "description": "API key missing or wrong (when the server requires one)"},
    413: {"model": schemas.ErrorResponse, "description": "Upload above the byte limit, image or request above the "
                                                         "pixel limit, too many files"},
    415: {"model": schemas.ErrorResponse, "description": "Not multipart, or the file part is not an image type"},
    422: {"model": schemas.ErrorResponse, "description": "Unusable image (empty, corrupt, not an image, too small, "
                                                         "multi-frame, DICOM without pixels or with a codec not "
                                                         "available), refused by the input-quality gate (code says "
                                                         "which check), or a bad parameter"},
    503: {"model": schemas.ErrorResponse, "description": "Model not loaded yet (see /ready), or the server is at its "
                                                         "memory/decode budget: retry after Retry-After seconds",
          "headers": {"Retry-After": {"description": "Seconds to wait (when busy)", "schema": {"type": "integer"}}}},
}
# The routes read their multipart bodies themselves (inference_api.uploads), so the schema states them here.
UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"], "properties": {"file": IMAGE_FIELD}}}}}}
BATCH_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["files"],
    "properties": {"files": {"type": "array", "items": IMAGE_FIELD, "minItems": 1}}}}}}}  # + maxItems: see below


def card_findings(settings: Settings, bundle: Bundle | None) -> list[str] | None:
    """Finding names for the schema's enums, from the bundle or its model.json (cheap: no weights)."""
    if bundle is not None:
        return list(bundle.findings)
    try:
        return [str(f) for f in read_card(settings.bundle)["findings"]]
    except Exception:
        return None


def with_enums(spec: dict, findings: list[str] | None) -> dict:
    """Make the schema say which finding names exist (they depend on the served bundle)."""
    if not findings:
        return spec
    comp = spec.get("components", {}).get("schemas", {})
    enum = {"type": "string", "enum": list(findings)}
    for model, prop in (("FindingResult", "finding"), ("Explanation", "finding")):
        if model in comp:
            comp[model]["properties"][prop].update(enum)
    for model, prop in (("PredictResponse", "positive_findings"), ("ModelCard", "findings")):
        if model in comp:
            comp[model]["properties"][prop]["items"] = dict(enum)
    for param in spec["paths"].get("/v1/explain/{finding}", {}).get("post", {}).get("parameters", []):
        if param["name"] == "finding":
            param["schema"] = {**param.get("schema", {}), **enum}
    name = "(" + "|".join(re.escape(f) for f in findings) + ")"
    for path in ("/v1/predict", "/v1/predict/batch"):
        for param in spec["paths"].get(path, {}).get("post", {}).get("parameters", []):
            if param["name"] == "findings":
                param["schema"] = {"type": "string", "pattern": f"^(all|{name}(,{name})*)?$"}
    return spec


def for_server(spec: dict, settings: Settings, findings: list[str] | None) -> dict:
    """FastAPI's schema made specific to this server: the finding names and the batch's file limit. get_openapi
    returns a fresh encoding, so this never touches the bodies above, which every app shares."""
    batch = spec["paths"].get("/v1/predict/batch", {}).get("post", {})
    files = batch.get("requestBody", {}).get("content", {}).get("multipart/form-data", {}).get("schema", {})
    if "files" in files.get("properties", {}):
        files["properties"]["files"]["maxItems"] = settings.max_batch_files
    return with_enums(spec, findings)
