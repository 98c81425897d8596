"""Service settings from the environment (prefix FEDXRAY_), e.g. FEDXRAY_BUNDLE=runs/x/bundle.

Lists (CORS origins) accept JSON (`["https://a"]`) or comma-separated text (`https://a,https://b`).
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FEDXRAY_", extra="ignore")

    bundle: str = Field("runs/demo/bundle", description="Model bundle directory (weights.safetensors + model.json)")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; None = torch's default (all cores)")
    max_upload_bytes: int = Field(50 * 1024 * 1024, ge=1024, description="Per request; larger bodies get 413")
    max_pixels: int = Field(40_000_000, ge=1, description="Images with more pixels (header) get 413, before decoding")
    min_resolution: int = Field(64, ge=1, description="Shorter side below this gets 422")
    max_batch_files: int = Field(16, ge=1, description="Images per /v1/predict/batch request")
    max_request_pixels: int = Field(160_000_000, ge=1, description="Pixels (headers) of all images of one "
                                    "request together; more gets 413 before anything is decoded")
    max_side: int = Field(2048, ge=64, description="Images are decoded reduced to this longer side at most")
    decode_slots: int = Field(2, ge=1, le=64, description="Images decoded at once, server-wide")
    decode_budget_bytes: int = Field(768 * 2**20, ge=2**24, description="Server-wide memory for decoding and "
                                     "for decoded images awaiting their answer; beyond it 503 + Retry-After")
    upload_budget_bytes: int = Field(256 * 2**20, ge=2**20, description="Server-wide memory for upload bodies")
    budget_wait_s: float = Field(10.0, ge=0, le=300, description="How long a request waits for a budget or a "
                                 "decode slot before 503")
    retry_after_s: int = Field(5, ge=1, le=3600, description="Retry-After sent with 503")
    api_key: SecretStr | None = Field(None, description="When set, every /v1 call needs it in the API-key header")
    api_key_header: str = Field("X-API-Key", description="Header that carries the API key")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list, description="Allowed browser origins")
    batch_window_ms: float = Field(5.0, ge=0, le=1000,
                                   description="How long a batch waits for requests already being decoded")
    max_batch: int = Field(8, ge=1, le=256, description="Largest micro-batch the model runs at once")
    forward: Literal["auto", "eager", "torchscript", "onnx"] = Field(
        "auto", description="The model's forward pass (inference_api.forward): auto = the fastest here, timed "
                            "on load among those available (onnx needs onnxruntime); each is checked against "
                            "eager on load")
    overlay_max_side: int = Field(512, ge=16, description="Longest side of overlays embedded in JSON responses")
    frontal_only: bool | None = Field(None, description="Warn on lateral views; None = what the bundle says")

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split(cls, v):
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("["):
                import json

                return json.loads(v)
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_is_none(cls, v):
        return None if isinstance(v, str) and not v.strip() else v
