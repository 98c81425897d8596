"""Response models: every field has a description so the OpenAPI schema documents the whole contract.

Finding names depend on the bundle: create_app puts them into the schema as enums (see inference_api.openapi).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from common.explain import CAM_METHODS
from common.quality import CODES as GATE_CODES

CamMethod = Literal[CAM_METHODS]  # type: ignore[valid-type]
# Every `code` an error body can carry: request-level, image-level (common.imageio) and the input gate's.
ERROR_CODES = ("bad_request", "unauthorized", "not_found", "method_not_allowed", "upload_too_large",
               "too_many_files", "too_many_pixels", "unsupported_media_type", "invalid_parameter",
               "unknown_finding", "overloaded", "not_ready", "empty", "not_an_image", "corrupt", "too_small",
               "multi_frame", "dicom_no_pixels", "dicom_unsupported", "unusable_image", *GATE_CODES)
ErrorCode = Literal[ERROR_CODES]  # type: ignore[valid-type]
GateCode = Literal[GATE_CODES]  # type: ignore[valid-type]


class FindingResult(BaseModel):
    finding: str = Field(description="Finding name, e.g. 'Pneumonia'")
    probability: float = Field(ge=0, le=1, description="Model probability (sigmoid for multi-label bundles), "
                               "calibrated on the validation split at export (GET /v1/model: provenance.calibration)")
    threshold: float = Field(description="Decision threshold chosen on the validation set, from the bundle")
    positive: bool = Field(description="probability >= threshold")


class Point(BaseModel):
    x: float = Field(description="Column in original-image pixels (0 = left edge pixel centre)")
    y: float = Field(description="Row in original-image pixels (0 = top edge pixel centre)")


class Explanation(BaseModel):
    finding: str = Field(description="Finding the heatmap explains")
    method: CamMethod = Field(description="CAM method: 'fast' (one-pass CAM, equal to Grad-CAM here) or a "
                                          "pytorch-grad-cam method such as 'gradcam++'")
    overlay_png_base64: str = Field(description="PNG of the heatmap (jet colours) blended over the image, base64")
    overlay_width: int = Field(description="Overlay width in pixels (the original, scaled to overlay_max_side)")
    overlay_height: int = Field(description="Overlay height in pixels")
    peak: Point = Field(description="Hottest point of the heatmap, in original-image pixels")


class ImageInfo(BaseModel):
    width: int = Field(description="Original width in pixels")
    height: int = Field(description="Original height in pixels")
    format: Literal["png", "jpeg", "dicom", "tiff", "bmp", "webp", "gif"] = Field(description="Detected format")
    bit_depth: int = Field(description="Bits per sample of the stored image")
    view: str | None = Field(None, description="DICOM ViewPosition (PA, AP, LL...) when present")


class ModelRef(BaseModel):
    model_id: str = Field(description="Content-derived id of the bundle (weights, findings, preprocessing)")
    version: str = Field(description="Model version: the card's 'version' if set, else its creation time")
    architecture: str = Field(description="Network architecture, e.g. resnet50")


class Timing(BaseModel):
    decode_ms: float = Field(description="Decoding the upload to pixels")
    preprocess_ms: float = Field(description="Resize, denoise and normalise")
    inference_ms: float = Field(description="Waiting for and running the (micro-batched) forward pass")
    explain_ms: float = Field(description="Heatmaps and overlay PNGs (0 without explain)")
    total_ms: float = Field(description="Server time for this image")
    batch_size: int = Field(description="Images in the micro-batch this one ran in")


class GateIssue(BaseModel):
    code: GateCode = Field(description="Which input check flagged the image")
    action: Literal["reject", "warn"] = Field(description="What the bundle's policy does for this check")
    detail: str = Field(description="What was seen, in words")


class InputCheck(BaseModel):
    issues: list[GateIssue] = Field(description="Checks that flagged the image and only warn (a refused image "
                                                "gets 422 with the code instead)")
    ood_score: float | None = Field(None, description="Feature distance from the validation images (null when "
                                                      "the bundle has no calibration)")
    ood_threshold: float | None = Field(None, description="Distance above which the image is out of distribution")


class PredictResponse(BaseModel):
    model: ModelRef
    image: ImageInfo
    findings: list[FindingResult] = Field(description="Every finding of the model, by probability, highest first")
    positive_findings: list[str] = Field(description="Findings whose probability reaches their threshold")
    explanations: list[Explanation] | None = Field(
        None, description="With explain=true: heatmaps of the positive findings, or of those named in `findings`")
    preview_png_base64: str | None = Field(
        None, description="With preview=true: the decoded image as a grayscale PNG (lets browsers show DICOM)")
    warnings: list[str] = Field(default_factory=list, description="Accepted, but read these (e.g. lateral view)")
    input_check: InputCheck = Field(description="The input-quality gate's result for this image")
    timing: Timing


class ErrorInfo(BaseModel):
    status: int = Field(description="HTTP status this image alone would have got")
    code: ErrorCode = Field(description="Reason code (stable, for programs)")
    detail: str = Field(description="What was wrong and what to do")


class BatchItem(BaseModel):
    index: int = Field(description="Position of the file in the request")
    filename: str | None = Field(None, description="File name as sent by the client")
    result: PredictResponse | None = Field(None, description="Prediction, when the image could be used")
    error: ErrorInfo | None = Field(None, description="Why the image was rejected, otherwise null")


class BatchResponse(BaseModel):
    items: list[BatchItem] = Field(description="One entry per uploaded file, in request order")
    succeeded: int = Field(description="Images predicted")
    failed: int = Field(description="Images rejected (see each item's error)")


class ErrorResponse(BaseModel):
    detail: str = Field(description="What was wrong and what to do next, in words")
    code: ErrorCode = Field(description="Reason code (stable, for programs)")


class ModelCard(BaseModel):
    model_id: str = Field(description="Content-derived bundle id")
    version: str = Field(description="Model version (card 'version', else creation time)")
    created: str | None = Field(None, description="When the bundle was written (UTC, ISO 8601)")
    fedxray_version: str | None = Field(None, description="fedxray version that wrote the bundle")
    architecture: dict[str, Any] = Field(description="Model section of the training config (arch, dropout...)")
    num_parameters: int | None = Field(None, description="Parameter count")
    findings: list[str] = Field(description="Output findings, in model order")
    multilabel: bool = Field(description="Sigmoid per finding (true) or softmax over exclusive classes (false)")
    thresholds: dict[str, float] = Field(description="Decision threshold per finding")
    preprocess: dict[str, Any] = Field(description="Preprocessing applied to every image (size, denoise, normalise)")
    frontal_only: bool = Field(description="Trained on frontal views only; lateral uploads get a warning")
    metrics: dict[str, Any] = Field(description="Validation/test metrics recorded at export (AUC, F1... per finding)")
    provenance: dict[str, Any] = Field(description="How it was trained (no paths, no raw run config): data "
                                                   "sizes, epochs or rounds, strategy, DP, settings, versions")
    privacy: dict[str, Any] | None = Field(None, description="Differential privacy (epsilon, delta...) when trained "
                                                             "with DP, else null")
    explanation_eval: dict[str, Any] | None = Field(
        None, description="Heatmap quality from `fedxray explain-eval` (pointing game, IoU per finding), if run")
    weights: dict[str, Any] = Field(description="Weights file, its sha256 and size")
    cam_methods: list[CamMethod] = Field(description="Heatmap methods this server accepts in `method`")
    input_gate: dict[str, Any] = Field(description="Input-quality gate: policy per reason code, thresholds, "
                                                   "out-of-distribution calibration and false-rejection rates on "
                                                   "the bundle's validation and test images")
    limits: dict[str, Any] = Field(description="This server's upload, pixel and batch limits")
    inference: dict[str, Any] = Field(default_factory=dict, description="How this server runs the model: the "
                                      "forward pass (eager, torchscript, onnx), its runtime version, and its "
                                      "largest difference to eager PyTorch on the load check")


class Health(BaseModel):
    status: str = Field(description="'ok' while the process serves requests")


class Ready(BaseModel):
    ready: bool = Field(description="Model loaded and the inference worker running")
    model_id: str | None = Field(None, description="Loaded bundle's id")
    forward: str | None = Field(None, description="The forward pass that serves predictions: eager, torchscript "
                                                  "or onnx (ONNX Runtime)")
    detail: str | None = Field(None, description="Why not ready (loading, or the load error)")
