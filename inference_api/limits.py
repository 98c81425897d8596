"""Server-wide memory budgets and decode slots: what keeps one hostile request from taking the machine.

Two byte budgets, each a count shared by every request of the process (asyncio, one event loop):
- upload bytes held in memory (bodies being read, then kept until the answer is sent);
- decode bytes: each image reserves an estimate of its decoder's peak from its header before any pixel is
  decoded (common.imageio.ImageHeader.decode_bytes), and keeps what it retains (model input, overlay
  pixels) until the answer is sent.
A reservation that cannot be had within `wait_s` becomes 503 with Retry-After; one larger than the whole
budget can never succeed and is 413. Decoding itself runs on `slots` threads of its own (CPU-bound work),
never more at once, so the process's peak memory is about idle + both budgets.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import lru_cache
from typing import Callable, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class Overloaded(Exception):
    """The server is at its budget: answer 503 with Retry-After."""

    def __init__(self, what: str, retry_after_s: int):
        super().__init__(f"the server is busy ({what}): retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class OverBudget(Exception):
    """One request needs more than the whole budget: answer 413."""


class Reservation:
    def __init__(self, budget: "Budget"):
        self.budget, self.amount = budget, 0

    async def grow(self, n: int) -> None:
        await self.budget._take(n)
        self.amount += n

    def shrink_to(self, n: int) -> None:
        """Keep only `n` (what the request still holds after a peak) and hand the rest back."""
        if n < self.amount:
            self.budget._give(self.amount - n)
            self.amount = n

    def release(self) -> None:
        self.budget._give(self.amount)
        self.amount = 0


class Budget:
    """A capacity (bytes) shared by concurrent requests; FIFO-fair enough for an admission control."""

    def __init__(self, capacity: int, what: str, *, wait_s: float, retry_after_s: int):
        self.capacity, self.what, self.wait_s, self.retry_after_s = int(capacity), what, wait_s, retry_after_s
        self.used = 0
        self.peak = 0
        self._changed: asyncio.Condition | None = None

    def _cond(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def _take(self, n: int) -> None:
        if n > self.capacity:
            raise OverBudget(f"needs {n:,} bytes of {self.what}, more than this server's whole budget of "
                             f"{self.capacity:,}")
        cond = self._cond()
        async with cond:
            try:
                await asyncio.wait_for(cond.wait_for(lambda: self.used + n <= self.capacity), self.wait_s)
            except asyncio.TimeoutError:
                raise Overloaded(self.what, self.retry_after_s) from None
            self.used += n
            self.peak = max(self.peak, self.used)

    def _give(self, n: int) -> None:
        if n <= 0:
            return
        self.used -= n
        cond = self._cond()

        async def notify():
            async with cond:
                cond.notify_all()

        asyncio.get_running_loop().create_task(notify())

    @asynccontextmanager
    async def reserve(self, n: int = 0):
        r = Reservation(self)
        try:
            if n:
                await r.grow(n)
            yield r
        finally:
            r.release()


def single_threaded_torch() -> None:
    """Run in each decode thread: its torch ops (resize, denoise, overlays) use one intra-op thread. The slots
    already run side by side, beside the model's pass; with torch's default (every core) each small op fought
    them for the cores: preprocessing a 512 px upload took 102 ms instead of 2.6 ms on a busy 2-core host
    (benchmarks/NOTES.md). torch's thread count is per thread here: the model's worker keeps its own."""
    import torch

    torch.set_num_threads(1)


class Decoder:
    """`slots` threads for decoding and preprocessing, plus malloc_trim after big images (see trim)."""

    def __init__(self, slots: int, *, wait_s: float, retry_after_s: int):
        self.slots = max(1, int(slots))
        self._pool = ThreadPoolExecutor(self.slots, thread_name_prefix="fedxray-decode",
                                        initializer=single_threaded_torch)
        self._free: asyncio.Semaphore | None = None
        self.wait_s, self.retry_after_s = wait_s, retry_after_s

    async def run(self, fn: Callable[..., T], *args, big: bool = False) -> T:
        if self._free is None:
            self._free = asyncio.Semaphore(self.slots)
        try:
            await asyncio.wait_for(self._free.acquire(), self.wait_s)
        except asyncio.TimeoutError:
            raise Overloaded("every decode slot is busy", self.retry_after_s) from None
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, _call, fn, args, big)
        finally:
            self._free.release()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _call(fn, args, big: bool):
    try:
        return fn(*args)
    finally:
        if big:
            trim()


@lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
        return lib if lib is not None and hasattr(lib, "malloc_trim") else None
    except OSError:
        return None


def trim() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise: RSS stayed at 2.6 GB after a burst)."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)
