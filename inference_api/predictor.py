"""The model, loaded once, behind a single worker thread that micro-batches concurrent requests.

Why one worker thread: torch already uses every core inside one forward pass, so running passes side by side
only adds contention, and the fast-CAM hook (and pytorch-grad-cam's hooks) must never see another request's
pass. Why micro-batching: on CPU one batch of 8 costs less than 8 single passes, so under concurrent load
throughput approaches the model's batched throughput.

Batching policy (the knobs a performance pass would tune are `max_batch`, `batch_window_s` and `run_batch`):
the worker takes the first queued image, then everything else already queued, then keeps waiting (up to
`batch_window_s` after the first one arrived) only while requests announced by `incoming()` are still being
decoded. A lone request therefore never waits for a window it cannot use.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from common.bundle import Bundle
from common.explain import cams_from_activations
from common.models import classifier_head
from common.training import probabilities
from inference_api import forward as forwards

log = logging.getLogger(__name__)


@dataclass
class ItemOutput:
    probabilities: np.ndarray        # (F,)
    cams: torch.Tensor | None        # (F, h, w) raw one-pass CAMs (not normalised) when asked for
    features: np.ndarray             # (D,) penultimate features, for the input gate's distance
    batch_size: int                  # images in the pass this one ran in
    forward_s: float                 # seconds of that pass


@dataclass
class _Job:
    x: torch.Tensor | None = None                       # (C, S, S) for a prediction
    want_cams: bool = False
    fn: Callable[[torch.nn.Module], Any] | None = None  # for exclusive calls (pytorch-grad-cam)
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.monotonic)


class PredictorClosed(RuntimeError):
    pass


class Arrival:
    """One announced image; `close` (idempotent) withdraws the announcement."""

    def __init__(self, predictor: "Predictor"):
        self._p, self._open = predictor, True
        with predictor._lock:
            predictor._expected += 1

    def close(self) -> None:
        if self._open:
            self._open = False
            with self._p._lock:
                self._p._expected -= 1


class Predictor:
    def __init__(self, bundle: Bundle, *, max_batch: int = 8, batch_window_s: float = 0.005,
                 threads: int | None = None, forward: str | forwards.Forward = "eager"):
        """`forward`: a built Forward, or a choice for inference_api.forward.build (auto|eager|torchscript|onnx)."""
        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()   # set again on the worker: torch's count is per thread
        self.bundle = bundle
        self.model = bundle.model.eval()   # eager: the reference, and what pytorch-grad-cam's methods run on
        self.forward = forward if isinstance(forward, forwards.Forward) else forwards.build(
            self.model, forward, image_size=bundle.preprocess.image_size, channels=bundle.preprocess.channels,
            threads=threads, multilabel=bundle.multilabel)
        self._head_weight = classifier_head(self.model).weight.detach()
        self.max_batch = max(1, int(max_batch))
        self.batch_window_s = max(0.0, float(batch_window_s))
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._deferred: list[_Job] = []
        self._expected = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.batch_sizes: Counter[int] = Counter()   # size -> number of passes: observable batching

    # ------------------------------------------------------------------------------------ life cycle

    def start(self) -> "Predictor":
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="fedxray-predictor", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None
        self._fail_pending(PredictorClosed("the predictor was shut down"))

    def __enter__(self) -> "Predictor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed

    # ---------------------------------------------------------------------------------------- public

    @contextmanager
    def incoming(self):
        """Announce an image still being read/decoded, so a forming batch may wait for it.

        The announcement ends when the image is submitted with this context's Arrival, or when the context
        exits (e.g. the upload was rejected).
        """
        arrival = Arrival(self)
        try:
            yield arrival
        finally:
            arrival.close()

    def submit(self, x: torch.Tensor, *, want_cams: bool = False, arrival: "Arrival | None" = None) -> Future:
        """Queue one preprocessed image (C, S, S); the Future resolves to an ItemOutput."""
        try:
            return self._put(_Job(x=x, want_cams=want_cams))
        finally:  # after the put, so the worker never sees "nothing queued, nothing expected" in between
            if arrival is not None:
                arrival.close()

    def call(self, fn: Callable[[torch.nn.Module], Any]) -> Future:
        """Run fn(model) on the worker thread, alone (no pass runs beside it): for pytorch-grad-cam methods."""
        return self._put(_Job(fn=fn))

    def run_batch(self, x: torch.Tensor, want_cams: bool) -> tuple[np.ndarray, torch.Tensor | None, np.ndarray]:
        """(B, C, S, S) -> probabilities (B, F), raw CAMs (B, F, h, w) or None, and penultimate features (B, D).

        The one forward pass (self.forward: eager, TorchScript or ONNX Runtime) gives the logits, the CAM target
        layer's feature map and the features the input gate needs; the CAMs are a small product of the last two.
        """
        logits, acts, feats = self.forward(x)
        with torch.inference_mode():
            cams = cams_from_activations(self._head_weight, acts) if want_cams else None
            probs = probabilities(logits, self.bundle.multilabel).float().numpy()
        return probs, cams, feats.float().numpy()

    def stats(self) -> dict:
        passes = sum(self.batch_sizes.values())
        items = sum(k * v for k, v in self.batch_sizes.items())
        return {"passes": passes, "images": items, "largest_batch": max(self.batch_sizes, default=0),
                "batch_sizes": dict(sorted(self.batch_sizes.items()))}

    # -------------------------------------------------------------------------------------- internals

    def _put(self, job: _Job) -> Future:
        if self._closed or self._thread is None:
            raise PredictorClosed("the predictor is not running")
        self._queue.put(job)
        return job.future

    def _next(self) -> _Job | None:
        return self._deferred.pop(0) if self._deferred else self._queue.get()

    def _collect(self, first: _Job) -> list[_Job]:
        batch, deadline = [first], first.queued_at + self.batch_window_s
        while len(batch) < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._expected == 0:
                    break
                try:
                    job = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if job is None or job.fn is not None:  # shutdown or exclusive call: after this batch
                self._deferred.append(job)
                break
            batch.append(job)
        return batch

    def _work(self) -> None:
        # torch's count is per thread: not whatever a decode thread (limits.single_threaded_torch) left. With ONNX
        # Runtime (its own thread pool) torch only runs the CAM product and the sigmoid here: one thread for those
        torch.set_num_threads(1 if self.forward.name == "onnx" else self.threads)
        while True:
            job = self._next()
            if job is None:
                return
            if job.fn is not None:
                self._run_call(job)
            else:
                self._run(self._collect(job))

    def _run_call(self, job: _Job) -> None:
        if job.future.set_running_or_notify_cancel():
            try:
                job.future.set_result(job.fn(self.model))
            except BaseException as e:  # handed to the caller, who maps it to an HTTP answer
                job.future.set_exception(e)

    def _run(self, batch: list[_Job]) -> None:
        batch = [j for j in batch if j.future.set_running_or_notify_cancel()]
        if not batch:
            return
        try:
            t0 = time.perf_counter()
            probs, cams, feats = self.run_batch(torch.stack([j.x for j in batch]), any(j.want_cams for j in batch))
            secs = time.perf_counter() - t0
        except BaseException as e:
            log.exception("inference failed for a batch of %d", len(batch))
            for j in batch:
                j.future.set_exception(e)
            return
        self.batch_sizes[len(batch)] += 1
        for i, j in enumerate(batch):
            item_cams = cams[i] if (cams is not None and j.want_cams) else None
            j.future.set_result(ItemOutput(probs[i], item_cams, feats[i], len(batch), secs))

    def _fail_pending(self, error: Exception) -> None:
        pending = list(self._deferred)
        self._deferred.clear()
        while True:
            try:
                pending.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for job in pending:
            if job is not None and job.future.set_running_or_notify_cancel():
                job.future.set_exception(error)
