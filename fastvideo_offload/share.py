"""One host store per node: the ranks of a group that run on one node map one copy of the blocks.

The node's leader (its lowest rank in the group) creates an anonymous memfd sized for every block
and fills it (packs its loaded weights, or reads the checkpoint into it); the node's other ranks
open it through /proc/<leader pid>/fd/<fd> and map the same pages. The memory has no name in any file
system, so nothing outlives the processes: it goes when the last one that maps it exits, SIGKILL
included. Every step is agreed
through torch.distributed (all_gather_object over the group): a rank that fails makes every rank
raise instead of leaving the others waiting.

The other ranks map the pages read-only: once enabled, the store changes only through
`NodeShare.change` (`mutate`, `load_state_dict`), a collective of the whole group in which each
node's leader writes the change once, between two barriers, so that no rank's forward reads a
half-written block and no change is applied once per rank.
"""

from __future__ import annotations

import copy
import datetime
import mmap
import os
import socket
import traceback
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import _ops, formats
from .sources import LiveWeights
from .store import BlockStore, span


#: The memfd is named MEMFD_NAME:<leader pid> (seen in /proc/*/maps and /proc/*/fd).
MEMFD_NAME = "fastvideo_offload-share"
_PAGE = mmap.PAGESIZE
#: How long a change of the shared store (`NodeShare.change`) waits for every rank of the group to
#: join it: a rank that changes the store alone gets an error after this, not a hang. Read by
#: `enable`, which creates the group changes are agreed in.
CHANGE_TIMEOUT = datetime.timedelta(seconds=120)


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
        self._leaders: list[int] = []  # each rank's node's leader, once the region is mapped
        self._changes = None  # the group changes are agreed in (`change`), once the region is mapped
        self._timeout = 0.0
        self._broken: str | None = None  # why changes are refused: a change timed out

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
        # budget, the other ranks their read-only mapping of them, and stages the others.
        region = self.region(blocks)

        def stores():
            for index, (names, params) in enumerate(blocks):
                def make(pinned):
                    return region.store(index, names, params, self if pinned else None, device)

                store = pin.store(BlockStore.nbytes(params), make)
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
            # Changes of the store are agreed in a group of their own, whose ops time out: a rank left
            # waiting there (a change made alone) breaks that group only, not the caller's.
            self._timeout = CHANGE_TIMEOUT.total_seconds()
            self._changes = dist.new_group(dist.get_process_group_ranks(self.group), timeout=CHANGE_TIMEOUT,
                                           backend="gloo", use_local_synchronization=True, sort_ranks=False)
        except BaseException as exc:
            # The frames of the failed step hold views of the mapping; clearing them lets it go now.
            traceback.clear_frames(exc.__traceback__)
            region.release()
            raise
        self._leaders = leaders
        return region

    def change(self, what: str, digest, write: Callable[[], None] | None = None,
               failed: BaseException | None = None) -> None:
        """Collective: one change of the node's shared store, which every rank of the group makes
        together, in the same order, and alike. Every rank's `digest` of what it changes (names and
        `checksum`s) must equal its node's leader's, or nothing is written and every rank raises;
        then each node's leader runs `write`, once every rank has joined (so none is in a forward),
        and no rank returns before every leader has written. Callers drop afterwards whatever they
        copied from the pages before (uploads in flight, staged copies), which may be torn.
        `failed`: this rank's own change failed (its caller raises that): the other ranks raise,
        and nothing is written anywhere.

        A rank that waits for the others longer than CHANGE_TIMEOUT (one that changes the store
        alone) raises, as do the others when they come; every later change of the store refuses."""
        if self._broken is not None:
            raise RuntimeError(self._broken)
        mine = _Failed(f"{type(failed).__name__}: {failed}") if failed is not None else (what, digest)
        values = self._exchange(mine, what, "nothing was changed")
        if failed is not None:
            return
        for r, v in enumerate(values):
            if isinstance(v, _Failed):
                raise RuntimeError(f"share: rank {r} of the group failed in {what}, which every rank makes together: "
                                   f"{v.message}; nothing was changed on any rank")
        for r, (theirs, digest_r) in enumerate(values):
            leader = self._leaders[r]
            ours, digest_l = values[leader]
            if theirs != ours or digest_r != digest_l:
                difference = (f"rank {r} is in {theirs}, rank {leader} in {ours}" if theirs != ours
                              else f"rank {r}'s {what} changes {_first_change(digest_r, digest_l)} otherwise than rank "
                                   f"{leader}'s")
                raise RuntimeError(
                    f"share: {difference}, its node's leader: the ranks that share a host store must make the same "
                    "change, which the leader writes once for its node; nothing was changed on any rank"
                )
        outcome = None
        if self._leaders[dist.get_rank(self.group)] == dist.get_rank(self.group):
            try:
                write()
            except Exception as exc:
                outcome = _Failed(f"{type(exc).__name__}: {exc}")
        # No rank reads the pages again before every leader has written.
        for r, o in enumerate(self._exchange(outcome, what, "the store may hold the change or part of it")):
            if o is not None:
                raise RuntimeError(f"share: rank {r}, the leader of its node, failed while writing {what} into the "
                                   f"shared host store: {o.message}; the store of that node may hold part of it")

    def _exchange(self, value, what: str, left: str) -> list:
        """Every rank's `value`, gathered in the share's group for changes, whose ops time out."""
        values = [None] * dist.get_world_size(self._changes)
        try:
            dist.all_gather_object(values, value, group=self._changes)
        except RuntimeError as exc:
            self._broken = (
                f"share: rank {dist.get_rank(self.group)} gave up on {what}: a node's shared host store changes only "
                "when every rank of its group makes the same change together (mutate, load_state_dict, in the same "
                f"order), and the others did not join it within share.CHANGE_TIMEOUT ({self._timeout:g} s) or failed; "
                f"{left}. Changes of this store are refused from now on: restart the ranks. Cause: {exc}"
            )
            raise RuntimeError(self._broken) from exc
        return values

    def shown(self, view: torch.Tensor) -> torch.Tensor:
        """What state_dict() returns for a host view of this store: in-place ops on it raise."""
        return view.as_subclass(SharedWeight) if type(view) is torch.Tensor else view


def _different_origins(rank: int, identity, leader: int, leaders: list | None) -> str:
    if identity is None or leaders is None:
        ways = ("its loaded weights", "a checkpoint") if identity is None else ("a checkpoint", "its loaded weights")
        return f"rank {rank} enables from {ways[0]}, rank {leader} on its node from {ways[1]}"
    return f"rank {rank} reads its blocks from other checkpoint files (or other bytes of them) than rank {leader}"


def checksum(t: torch.Tensor) -> list[int]:
    """Exact integer sums of `t`'s bytes (all of them, weighted by their row and by their column when
    laid out in rows of _ROW), computed where `t` lives: equal bytes give equal sums on any device and
    thread count. Ranks that make different changes are told apart by them; bytes that differ
    only by a permutation within rows and columns at once are not (a check, not a proof)."""
    b = formats.plain(t).contiguous().view(-1).view(torch.uint8)
    rows = b.numel() // _ROW
    body, tail = b[: rows * _ROW].view(rows, _ROW), b[rows * _ROW :]
    by_row, by_col = body.sum(1, dtype=torch.int64), body.sum(0, dtype=torch.int64)
    sums = torch.stack([by_row.sum() + tail.sum(dtype=torch.int64), (by_row * _weights(rows, b.device)).sum(),
                        (by_col * _weights(_ROW, b.device)).sum() + (tail * _weights(tail.numel(), b.device)).sum()])
    return sums.tolist()


_ROW = 4099  # a prime: a tensor's rows are seldom a multiple of it, so its rows and these cross


def _weights(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(1, n + 1, dtype=torch.int64, device=device)


def _first_change(a: list, b: list) -> str:
    """The first entry of two digests ((name, sums) pairs, or problems) that differs, by name."""
    for x, y in zip(a, b):
        if x != y:
            return x[0] if isinstance(x, (tuple, list)) else str(x)
    return f"{len(a)} weights against {len(b)}"


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
        self._writable = True  # the leader's mapping; the other ranks' is read-only
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
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
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
        # Read-only: only the leader writes the pages, inside a change of the share (NodeShare.change).
        self._mmap_fd(os.fstat(self._fd).st_size, writable=False)

    def _mmap_fd(self, size: int, writable: bool = True) -> None:
        self._writable = writable
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self._map = mmap.mmap(self._fd, size, mmap.MAP_SHARED, prot)
        # Through a memoryview, which holds an export of the mapping: close() then refuses
        # (BufferError) while a tensor views it, instead of unmapping memory still in use.
        with warnings.catch_warnings():
            # torch warns that it has no read-only tensors: nothing of this package writes a
            # follower's views, and state_dict() hands them out as SharedWeight, which refuses.
            warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)
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
            _pin(memory, owner, device, read_only=not self._writable)
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



_IN_PLACE_OPERATORS = frozenset(
    f"__i{op}__" for op in ("add", "sub", "mul", "matmul", "truediv", "floordiv", "mod", "pow", "lshift", "rshift",
                            "and", "or", "xor")
) | {"__setitem__"}


class SharedWeight(torch.Tensor):
    """What state_dict() returns for a weight of a node's shared host store: the pages it views are
    written only by a change of the share, and the node's other ranks map them read-only, where a
    write would kill the process (SIGSEGV). So in-place torch ops on it, or on a view of it, raise
    instead, and `.numpy()` gives a read-only array; anything else sees the tensor it is, and
    torch.save writes, and copy.deepcopy makes, a plain tensor. Change the weights with
    `load_state_dict` or `mutate`."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        outs = kwargs.get("out")
        outs = outs if isinstance(outs, (tuple, list)) else [outs]
        in_place = (name.endswith("_") and not name.startswith("_")) or name in _IN_PLACE_OPERATORS
        if (in_place and args and isinstance(args[0], SharedWeight)) or any(isinstance(o, SharedWeight) for o in outs):
            raise RuntimeError(
                f"{name}: this tensor is a weight in a node's shared host store (enable(share=...)), which the ranks "
                "map read-only and change only all together: change it with load_state_dict or handle.mutate on "
                "every rank, or write into a copy (.clone())"
            )
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
            pages = {a.untyped_storage().data_ptr() for a in args if isinstance(a, SharedWeight)}
            if name in ("numpy", "__array__"):
                out.flags.writeable = False
            return _keep_shared(out, pages)

    def __reduce_ex__(self, protocol):
        with torch._C.DisableTorchFunctionSubclass():
            return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)

    def __deepcopy__(self, memo):
        with torch._C.DisableTorchFunctionSubclass():
            return copy.deepcopy(self.as_subclass(torch.Tensor), memo)  # a copy in this process's memory


def _keep_shared(out, pages: set[int]):
    """`out` with every tensor that views the shared pages a SharedWeight, and every other one plain."""
    if isinstance(out, (tuple, list)):
        items = [_keep_shared(o, pages) for o in out]
        return items if isinstance(out, list) else tuple(items) if type(out) is tuple else type(out)(items)
    if not isinstance(out, torch.Tensor) or out.layout != torch.strided:
        return out
    shared = out.untyped_storage().data_ptr() in pages
    if shared == isinstance(out, SharedWeight):
        return out
    return out.as_subclass(SharedWeight if shared else torch.Tensor)


def _pin(memory: torch.Tensor, owner, device: torch.device, read_only: bool) -> None:
    """Page-locks `memory` (a block's pages of the mapping) in place for `device`'s copies, until
    `owner` goes. Out of memory raises torch.OutOfMemoryError, which the pin budget's fall-back
    turns into staging. The finalizer holds `memory`, so the pages stay mapped until unlocked."""
    _ops.pin_host(memory, device, read_only)
    weakref.finalize(owner, _unpin, memory, device)


def _unpin(memory: torch.Tensor, device: torch.device) -> None:
    # The engine's copies from the mapping must be done before its pages are unlocked.
    torch.cuda.synchronize(device)
    _ops.unpin_host(memory, device)
