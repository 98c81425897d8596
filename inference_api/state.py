"""What one app holds: its settings, the server-wide upload/decode budgets and decode slots, and, once the bundle
is loaded (in a background thread, so /health answers at once), the model `Runtime` the routes use."""
from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Callable

from common.bundle import Bundle, load_bundle
from common.explain import FAST
from common.imageio import ImageHeader
from inference_api.metrics import Refusals
from inference_api.limits import Budget, Decoder, Reservation
from inference_api.predictor import Predictor
from inference_api.service import Prepared, Service
from inference_api.settings import Settings
from inference_api.uploads import UploadedFile, check_content_type

log = logging.getLogger("fedxray.api")


@dataclass
class Runtime:
    """The loaded model: the service (bytes -> model input -> response), the micro-batching predictor, and the
    steps the predict and explain routes share."""
    service: Service
    predictor: Predictor
    decoder: Decoder

    def probe(self, upload: UploadedFile) -> ImageHeader:
        """The upload's content type and image header, checked before anything is decoded."""
        check_content_type(upload.content_type)
        return self.service.probe(upload.data, upload.filename)

    async def decode(self, upload: UploadedFile, header: ImageHeader, held: Reservation,
                     keep_side: int | None) -> Prepared:
        """Decode on a decode slot; afterwards the reservation keeps only what the answer still needs."""
        prepared = await self.decoder.run(self.service.prepare, upload.data, upload.filename, keep_side,
                                          big=header.pixels > 4_000_000)
        held.shrink_to(prepared.retained_bytes)
        return prepared

    async def heatmaps(self, prepared: Prepared, out, targets: list[int], method: str):
        """(T, h, w) maps: the one-pass CAMs already computed, or pytorch-grad-cam run alone on the worker."""
        if method == FAST:
            return out.cams[targets]
        return await asyncio.wrap_future(self.predictor.call(self.service.grad_cam(prepared.x, targets, method)))


class AppState:
    """What the routes need, filled in once the bundle is loaded."""

    def __init__(self, settings: Settings, announce: Callable[[str], None] | None = None):
        self.settings = settings
        self.announce = announce
        self.runtime: Runtime | None = None
        self.error: str | None = None
        self.load_finished = threading.Event()
        s = settings
        self.uploads = Budget(s.upload_budget_bytes, "upload memory", wait_s=s.budget_wait_s,
                              retry_after_s=s.retry_after_s)
        self.decodes = Budget(s.decode_budget_bytes, "decode memory", wait_s=s.budget_wait_s,
                              retry_after_s=s.retry_after_s)
        self.decoder = Decoder(s.decode_slots, wait_s=s.budget_wait_s, retry_after_s=s.retry_after_s)
        self.refusals = Refusals()   # error answers by code, for GET /metrics

    def load(self, bundle: Bundle | None = None) -> None:
        s = self.settings
        try:
            bundle = bundle or load_bundle(s.bundle)
            service = Service(bundle, max_pixels=s.max_pixels, min_resolution=s.min_resolution,
                              overlay_max_side=s.overlay_max_side, frontal_only=s.frontal_only, max_side=s.max_side)
            predictor = Predictor(bundle, max_batch=s.max_batch, batch_window_s=s.batch_window_ms / 1000,
                                  threads=s.threads, forward=s.forward).start()
            self.runtime = Runtime(service, predictor, self.decoder)
            fwd = predictor.forward
            line = (f"model {bundle.model_id} ({bundle.model_config.arch}, {len(bundle.findings)} findings) ready; "
                    f"forward: {fwd.name} ({fwd.detail}" + (f", built in {fwd.build_s:.1f} s" if fwd.build_s else "")
                    + (f", timed on load: {fwd.check['measured_ms']} ms" if "measured_ms" in fwd.check else "") + ")")
            log.info(line)
            if self.announce is not None:
                self.announce(line)
            if fwd.name != s.forward and s.forward != "auto":
                log.warning("forward %s was asked for but %s runs (see the warning above)", s.forward, fwd.name)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            log.error("could not load the model bundle: %s", self.error)
        finally:
            self.load_finished.set()

    def limits(self) -> dict:
        s = self.settings
        return {"max_upload_bytes": s.max_upload_bytes, "max_pixels_per_image": s.max_pixels,
                "max_request_pixels": s.max_request_pixels, "max_batch_files": s.max_batch_files,
                "min_resolution": s.min_resolution, "decoded_max_side": s.max_side, "decode_slots": s.decode_slots,
                "decode_budget_bytes": s.decode_budget_bytes, "upload_budget_bytes": s.upload_budget_bytes}

    def close(self) -> None:
        if self.runtime is not None:
            self.runtime.predictor.close()
        self.decoder.close()
