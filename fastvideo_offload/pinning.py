"""The pinned-memory budget (`enable(..., host_pin_budget=...)`): which blocks' host buffers are
pinned and which stay pageable and reach the device through the engine's staging ring
(csrc/staging.cpp); "auto" from the cgroup limit and MemAvailable; and the fall-back to staging
when pinning fails part-way (a memory limit hit)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch

from .arguments import leave_headroom
from .store import BlockStore

logger = logging.getLogger("fastvideo_offload")

#: host_pin_budget="auto" leaves max(PIN_HEADROOM_MIN, PIN_HEADROOM_FRACTION of the memory limit)
#: unpinned: pinned pages cannot be reclaimed or swapped, and the pageable blocks, activations and
#: the rest of the process still need room.
PIN_HEADROOM_MIN = 2 << 30
PIN_HEADROOM_FRACTION = 0.25

_CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def auto_pin_budget(read: Callable[[str], str | None] = _read) -> int:
    """Bytes that may be pinned: the memory still available (MemAvailable, and the cgroup's limit
    less its usage, whichever is less), less max(PIN_HEADROOM_MIN, PIN_HEADROOM_FRACTION of the
    memory limit: MemTotal or the cgroup's, whichever is less). `read(path)` gives a file's text or None."""
    meminfo = {}
    for line in (read("/proc/meminfo") or "").splitlines():
        key, _, value = line.partition(":")
        fields = value.split()
        if fields:
            meminfo[key] = int(fields[0]) * 1024  # kB
    if "MemTotal" not in meminfo or "MemAvailable" not in meminfo:
        raise RuntimeError("host_pin_budget='auto': /proc/meminfo has no MemTotal or MemAvailable")
    limit, available = meminfo["MemTotal"], meminfo["MemAvailable"]
    for limit_file, usage_file in _CGROUP_FILES:
        text = (read(limit_file) or "").strip()
        # v2 says "max" for no limit; v1 says a huge number (about 2**63).
        if text.isdigit() and int(text) < limit:
            usage = int((read(usage_file) or "0").strip() or 0)
            limit, available = int(text), min(available, max(0, int(text) - usage))
            break
    return leave_headroom(available, limit, at_least=PIN_HEADROOM_MIN, fraction=PIN_HEADROOM_FRACTION)


class PinPlan:
    """Decides, block by block in order, whether its host buffer is pinned (within the budget) or
    pageable and staged. `budget=None` pins every block on CUDA, as without a budget (a failure to
    pin then fails enable). On the CPU devices "pinned" is only a flag: every buffer is pageable."""

    def __init__(self, budget: int | None, cuda: bool):
        self.left = budget
        self.cuda = cuda
        self.failed: BaseException | None = None
        self._lock = threading.Lock()  # a checkpoint allocates blocks on several threads

    def want(self, nbytes: int) -> bool:
        """Whether the next block (of `nbytes`) is to be pinned; called in block order."""
        with self._lock:
            if self.left is None:
                return True
            if self.failed is not None or nbytes > self.left:
                return False
            self.left -= nbytes
            return True

    def alloc(self, pinned: bool, make: Callable[[bool], BlockStore]) -> BlockStore:
        """`make(pin)`: the block's store, pinned or pageable. A pinned allocation that fails
        within a budget falls back to a pageable, staged store, and no later block tries to pin.
        Pinning that the driver does not support at all (cudaHostRegister in some sandboxes) falls
        back so with or without a budget."""
        with self._lock:
            unsupported = isinstance(self.failed, NotImplementedError)
        if not pinned or unsupported:
            return _staged(make(False))
        try:
            return self._pin(make)
        except Exception as exc:
            if not isinstance(exc, NotImplementedError) and (self.left is None or not is_allocation_failure(exc)):
                raise
            with self._lock:
                first, self.failed = self.failed is None, exc
            if first:
                logger.warning("pinning host memory failed (%s); this block and the rest are staged instead", exc)
            return _staged(make(False))

    def store(self, nbytes: int, make: Callable[[bool], BlockStore]) -> BlockStore:
        return self.alloc(self.want(nbytes), make)

    def _pin(self, make: Callable[[bool], BlockStore]) -> BlockStore:
        return make(self.cuda)


def _staged(store: BlockStore) -> BlockStore:
    store.staged = True
    return store


def resolve(budget: int | str | None) -> int | None:
    return auto_pin_budget() if budget == "auto" else budget


def is_allocation_failure(exc: BaseException) -> bool:
    # cudaHostAlloc fails as "CUDA error: out of memory", posix_memalign as "could not allocate".
    text = str(exc).lower()
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    return "out of memory" in text or "could not allocate" in text
