"""One host store per node: the ranks of a group that run on one node map one copy of the blocks.

The node's leader (its lowest rank in the group) creates an anonymous memfd sized for every block
and packs the blocks into it; the node's other ranks open it through /proc/<leader pid>/fd/<fd>
and map the same pages. The memory has no name in any file system, so nothing outlives the
processes: it goes when the last one that maps it exits, SIGKILL included. Every step is agreed
through torch.distributed (all_gather_object over the group): a rank that fails makes every rank
raise instead of leaving the others waiting.
"""

from __future__ import annotations

import mmap
import os
import socket
import traceback
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import formats
from .sources import LiveWeights
from .store import BlockStore, span

#: The memfd is named MEMFD_NAME:<leader pid> (seen in /proc/*/maps and /proc/*/fd).
MEMFD_NAME = "fastvideo_offload-share"
_PAGE = mmap.PAGESIZE


def resolve(share) -> NodeShare | None:
    """`enable`'s `share=` argument: None, "node" (the default process group) or a ProcessGroup."""
    if share is None:
        return None
    if isinstance(share, str):
        if share != "node":
            raise ValueError(f"share: expected 'node', a ProcessGroup or None, got {share!r}")
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "share='node' shares among the ranks of torch.distributed's default process group, which is not "
                "initialized: call torch.distributed.init_process_group first"
            )
        return NodeShare(dist.group.WORLD)
    if dist.is_available() and isinstance(share, dist.ProcessGroup):
        if dist.get_rank(share) < 0:
            raise ValueError("share: this process is not a rank of the given ProcessGroup")
        return NodeShare(share)
    raise TypeError(f"share: expected 'node', a ProcessGroup or None, got {type(share).__name__}")


def _node() -> tuple[str, str]:
    # The boot id tells two hosts apart even where containers give them one host name.
    with open("/proc/sys/kernel/random/boot_id") as f:
        return socket.gethostname(), f.read().strip()


def _signature(blocks) -> list:
    return [[(n, str(p.dtype), tuple(p.shape), p.stride()) for n, p in zip(names, params)] for names, params in blocks]


class Refused(ValueError):
    """The ranks hold different blocks or weights: raised on every rank of the group alike."""


@dataclass
class _Failed:
    message: str


class NodeShare(LiveWeights):
    """The agreement of one `enable(..., share=...)` call among the ranks of `group`. Every rank
    of the group must call `enable` with it. As the source of enable's host stores (sources.py),
    it gives views into the node's one copy instead of packing a store of this rank's own."""

    label = "sharing blocks"

    def __init__(self, group):
        self.group = group
        self._joined = False

    def host_stores(self, blocks, pin, device: torch.device | None):
        # `pin` is unused: a node's region is registered whole (enable refuses a pin budget with share).
        # Collective: the node's ranks agree on one copy, which its leader packs here.
        region = self.region(self, blocks, device or torch.device("cpu"))
        for index, (names, params) in enumerate(blocks):
            yield region.store(index, names, params)

    def abandon(self, exc: BaseException) -> None:
        """This rank's `enable` failed before its first step: the others learn it there and raise."""
        if not self._joined:
            self._joined = True
            self._gather(_Failed(f"{type(exc).__name__}: {exc}"))

    def _gather(self, value) -> list:
        values = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(values, value, group=self.group)
        return values

    def _step(self, what: str, fn):
        """Runs `fn` here and gathers every rank's result; raises on every rank if one failed."""
        self._joined = True
        try:
            value = fn()
        except Exception as exc:
            self._gather(_Failed(f"{type(exc).__name__}: {exc}"))
            raise
        values = self._gather(value)
        for rank, v in enumerate(values):
            if isinstance(v, _Failed):
                raise RuntimeError(f"share: rank {rank} of the group failed while {what}: {v.message}")
        return values

    def region(self, owner, blocks: list[tuple[list[str], list[torch.nn.Parameter]]], device) -> SharedRegion:
        """Collective: the node's one copy of `blocks` (names, parameters), packed by its leader,
        mapped here and checked to hold this rank's own weights. `owner` (this share, which the
        handle keeps) unpins it on CUDA when it goes."""
        me = dist.get_rank(self.group)
        infos = self._step("describing its blocks", lambda: (_node(), os.getpid(), _signature(blocks)))
        # Every rank judges every node from the same gathered values, so all raise together.
        leaders = [next(q for q, other in enumerate(infos) if other[0] == info[0]) for info in infos]
        for r, info in enumerate(infos):
            if info[2] != infos[leaders[r]][2]:
                raise Refused(
                    f"share: rank {r} offloads blocks that differ from rank {leaders[r]}'s on its node (names, dtypes, "
                    f"shapes or strides: {_first_difference(info[2], infos[leaders[r]][2])}); only ranks holding the "
                    "same model can share a host store"
                )
        leader = leaders[me]
        sizes = [BlockStore.nbytes(params) for _, params in blocks]
        offsets = []
        total = 0
        for n in sizes:
            offsets.append(total)
            total += -(-n // _PAGE) * _PAGE  # each block on pages of its own
        region = SharedRegion(offsets, sizes)
        try:
            created = self._step("creating the shared memory", lambda: region.create(total) if me == leader else None)
            _, leader_pid, _ = infos[leader]
            self._step("mapping the shared memory", lambda: region.open(leader, leader_pid, *created[leader])
                       if me != leader else None)
            region.close_fd()  # every rank of the node has its own mapping now
            self._step("packing the blocks", lambda: region.fill(blocks) if me == leader else None)
            mismatches = self._step("comparing its weights", lambda: region.differences(blocks) if me != leader else [])
            different = [(r, names) for r, names in enumerate(mismatches) if names]
            if different:
                r, names = different[0]
                raise Refused(
                    f"share: rank {r}'s weights differ from rank {leaders[r]}'s in {len(names)} parameter(s) "
                    f"({', '.join(names[:3])}{'...' if len(names) > 3 else ''}); ranks holding different weights "
                    "cannot share a host store: load the same weights on every rank, or enable without share="
                )
            if device.type == "cuda":
                region.pin(owner, device)
        except BaseException as exc:
            # The frames of the failed step hold views of the mapping; clearing them lets it go now.
            traceback.clear_frames(exc.__traceback__)
            region.release()
            raise
        return region


def _first_difference(a: list, b: list) -> str:
    if len(a) != len(b):
        return f"{len(a)} blocks against {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            diff = next((f"{p} against {q}" for p, q in zip(x, y) if p != q), f"{len(x)} parameters against {len(y)}")
            return f"block {i}: {diff}"
    return "none"


class SharedRegion:
    """One memfd's mapping: every block's host buffer at a page-aligned offset."""

    def __init__(self, offsets: list[int], sizes: list[int]):
        self.offsets, self.sizes = offsets, sizes
        self._fd: int | None = None
        self._map: mmap.mmap | None = None
        self._base: torch.Tensor | None = None

    def create(self, total: int) -> tuple[int, int]:
        """The leader's memfd, its pages allocated now (an error here, not an OOM kill mid-packing);
        returns what the node's other ranks open it by."""
        self._fd = os.memfd_create(f"{MEMFD_NAME}:{os.getpid()}", os.MFD_CLOEXEC)
        size = max(total, _PAGE)
        try:
            os.posix_fallocate(self._fd, 0, size)
        except OSError as exc:
            raise RuntimeError(f"share: could not allocate {size} bytes of shared host memory: {exc}") from exc
        self._mmap_fd(size)
        return self._fd, os.fstat(self._fd).st_ino

    def open(self, leader: int, pid: int, fd: int, inode: int) -> None:
        path = f"/proc/{pid}/fd/{fd}"
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise RuntimeError(
                f"share: the shared host store of rank {leader} (pid {pid}) is gone: that process exited"
            ) from exc
        except PermissionError as exc:
            raise RuntimeError(
                f"share: cannot open rank {leader}'s shared host store at {path}: the ranks of a node must run as "
                "one user in one PID namespace"
            ) from exc
        if os.fstat(self._fd).st_ino != inode:  # the pid was reused by another process
            raise RuntimeError(f"share: rank {leader} (pid {pid}) exited; {path} is another process's file")
        self._mmap_fd(os.fstat(self._fd).st_size)

    def _mmap_fd(self, size: int) -> None:
        self._map = mmap.mmap(self._fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._base = torch.frombuffer(self._map, dtype=torch.uint8)

    def close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def release(self) -> None:
        """Drops this process's hold on the memory (on a failure; stores still in use keep it)."""
        self.close_fd()
        self._base = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a store still views it; it goes with the last one
                pass
            self._map = None

    def store(self, index: int, names: list[str], params: list[torch.nn.Parameter]) -> BlockStore:
        off = self.offsets[index]
        return BlockStore.over(names, params, self._base[off : off + self.sizes[index]])

    def fill(self, blocks) -> None:
        with torch.no_grad():
            for index, (names, params) in enumerate(blocks):
                store = self.store(index, names, params)
                for holder, view in zip(store.params, store.views):
                    span(view).copy_(span(formats.plain(holder)))

    def differences(self, blocks) -> list[str]:
        """The names of this rank's parameters whose bytes are not the region's: an exact check,
        read at memory speed, with no hash that two different weights could share."""
        different = []
        for index, (names, params) in enumerate(blocks):
            store = self.store(index, names, params)
            for name, holder, view in zip(store.names, store.params, store.views):
                mine = span(formats.plain(holder)).to("cpu")
                if not torch.equal(span(view).view(torch.uint8), mine.view(torch.uint8)):
                    different.append(name)
        return different

    def pin(self, owner, device: torch.device) -> None:
        """Page-locks the mapping in place for `device`'s copies, until `owner` goes."""
        cudart = torch.cuda.cudart()
        ptr, size = self._base.data_ptr(), self._base.numel()
        with torch.cuda.device(device):
            err = cudart.cudaHostRegister(ptr, size, 0)
        if int(err) != 0:
            raise RuntimeError(f"share: cudaHostRegister of {size} bytes of shared host memory failed ({err})")
        weakref.finalize(owner, _unpin, ptr, device)


def _unpin(ptr: int, device: torch.device) -> None:
    # The engine's copies from the mapping must be done before its pages are unlocked.
    torch.cuda.synchronize(device)
    torch.cuda.cudart().cudaHostUnregister(ptr)
