"""One host store per node: the ranks of a group that run on one node map one copy of the blocks.

The node's leader (its lowest rank in the group) creates an anonymous memfd sized for every block
and fills it (packs its loaded weights, or reads the checkpoint into it); the node's other ranks
open it through /proc/<leader pid>/fd/<fd> and map the same pages. The memory has no name in any file system, so nothing outlives the
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

from . import _ops, formats
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


class NodeShare:
    """The agreement of one `enable(..., share=...)` call among the ranks of `group`. Every rank
    of the group must call `enable` with it. As the source of enable's host stores (sources.py),
    it gives views into the node's one copy, which the node's leader fills from `source` (the
    model's own weights, or a checkpoint's), instead of a store of this rank's own."""

    def __init__(self, group):
        self.group = group
        self.source = LiveWeights()
        self._joined = False

    def over(self, source) -> NodeShare:
        """The source the node's leader fills the shared store from."""
        self.source = source
        return self

    @property
    def label(self) -> str:
        return f"{self.source.label}, shared on this node"

    def check(self, model) -> None:
        self.source.check(model)

    def resident(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        return self.source.resident(tensor, device)

    def host_stores(self, blocks, pin, device: torch.device | None):
        # Collective, and run at this call, not at the first store asked for: a rank with no block
        # still takes every step. Then each rank pins (registers) the blocks within its own pin
        # budget and stages the others.
        region = self.region(blocks)

        def stores():
            for index, (names, params) in enumerate(blocks):
                store = pin.store(BlockStore.nbytes(params),
                                  lambda pinned: region.store(index, names, params, self if pinned else None, device))
                self.source.adopt(store)
                yield store

        return stores()

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

    def region(self, blocks: list[tuple[list[str], list[torch.nn.Parameter]]]) -> SharedRegion:
        """Collective: the node's one copy of `blocks` (names, parameters), filled by its leader
        and mapped here; this rank's own weights are checked to be its bytes, or (from a
        checkpoint) to come from the same file ranges. Every rank runs the same steps, whatever
        its node decided, so that none waits for a step another skips."""
        me = dist.get_rank(self.group)
        infos = self._step("describing its blocks",
                           lambda: (_node(), os.getpid(), _signature(blocks), self.source.identity(blocks)))
        # Every rank judges every node from the same gathered values, so all raise together.
        leaders = [next(q for q, other in enumerate(infos) if other[0] == info[0]) for info in infos]
        for r, info in enumerate(infos):
            first = infos[leaders[r]]
            if info[2] != first[2]:
                raise Refused(
                    f"share: rank {r} offloads blocks that differ from rank {leaders[r]}'s on its node (names, dtypes, "
                    f"shapes or strides: {_first_difference(info[2], first[2])}); only ranks holding the "
                    "same model can share a host store"
                )
            if info[3] != first[3]:
                raise Refused(f"share: {_different_origins(r, info[3], leaders[r], first[3])}; ranks that share a "
                              "host store enable all from the same checkpoint, or all from their loaded weights")
        leader = leaders[me]
        sizes = [BlockStore.nbytes(params) for _, params in blocks]
        offsets = []
        total = 0
        for n in sizes:
            offsets.append(total)
            total += -(-n // _PAGE) * _PAGE  # each block on pages of its own
        region = SharedRegion(offsets, sizes)
        compare = infos[me][3] is None  # loaded weights are compared; a checkpoint's ranges were
        try:
            created = self._step("creating the shared memory", lambda: region.create(total) if me == leader else None)
            _, leader_pid, _, _ = infos[leader]
            self._step("mapping the shared memory", lambda: region.open(leader, leader_pid, *created[leader])
                       if me != leader else None)
            region.close_fd()  # every rank of the node has its own mapping now
            self._step("filling the shared store", lambda: region.fill(self.source, blocks) if me == leader else None)
            mismatches = self._step("comparing its weights",
                                    lambda: region.differences(blocks) if me != leader and compare else [])
            different = [(r, names) for r, names in enumerate(mismatches) if names]
            if different:
                r, names = different[0]
                raise Refused(
                    f"share: rank {r}'s weights differ from rank {leaders[r]}'s in {len(names)} parameter(s) "
                    f"({', '.join(names[:3])}{'...' if len(names) > 3 else ''}); ranks holding different weights "
                    "cannot share a host store: load the same weights on every rank, or enable without share="
                )
        except BaseException as exc:
            # The frames of the failed step hold views of the mapping; clearing them lets it go now.
            traceback.clear_frames(exc.__traceback__)
            region.release()
            raise
        return region


def _different_origins(rank: int, identity, leader: int, leaders: list | None) -> str:
    if identity is None or leaders is None:
        ways = ("its loaded weights", "a checkpoint") if identity is None else ("a checkpoint", "its loaded weights")
        return f"rank {rank} enables from {ways[0]}, rank {leader} on its node from {ways[1]}"
    return f"rank {rank} reads its blocks from other checkpoint files (or other bytes of them) than rank {leader}"


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
        # Through a memoryview, which holds an export of the mapping: close() then refuses
        # (BufferError) while a tensor views it, instead of unmapping memory still in use.
        self._base = torch.frombuffer(memoryview(self._map), dtype=torch.uint8)

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

    def store(self, index: int, names: list[str], params: list[torch.nn.Parameter], owner=None,
              device: torch.device | None = None) -> BlockStore:
        """Block `index`'s store in the mapping; with an `owner`, registered (pinned) for the CUDA
        `device`'s copies until the owner goes."""
        off = self.offsets[index]
        memory = self._base[off : off + self.sizes[index]]
        if owner is not None and memory.numel():
            _pin(memory, owner, device)
        return BlockStore.over(names, params, memory)

    def fill(self, source, blocks) -> None:
        source.fill([self.store(index, names, params) for index, (names, params) in enumerate(blocks)])

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



def _pin(memory: torch.Tensor, owner, device: torch.device) -> None:
    """Page-locks `memory` (a block's pages of the mapping) in place for `device`'s copies, until
    `owner` goes. Out of memory raises torch.OutOfMemoryError, which the pin budget's fall-back
    turns into staging. The finalizer holds `memory`, so the pages stay mapped until unlocked."""
    _ops.pin_host(memory, device)
    weakref.finalize(owner, _unpin, memory, device)


def _unpin(memory: torch.Tensor, device: torch.device) -> None:
    # The engine's copies from the mapping must be done before its pages are unlocked.
    torch.cuda.synchronize(device)
    _ops.unpin_host(memory, device)
