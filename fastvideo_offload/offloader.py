"""One offloaded model: the handle `enable` builds and users keep, and its `disable`."""

from __future__ import annotations

import contextlib
import logging
import sys
import weakref
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from . import _ops, formats, registry, share as node_share
from .arguments import byte_count
from .budget import DeviceBudget
from .blocks import BlockList, find_block_lists
from .checkpoint import CheckpointWeights
from .config import OffloadConfig
from .hooks import Hooks, attach_block_hooks, eager
from .outside import OutsideCalls
from .pinning import PinPlan, is_allocation_failure, resolve as resolve_pin_budget
from .planner import ring_slots
from .placement import OffloadReport
from .retained import RetainedCheck
from .sources import LiveWeights, assign
from .state_dict import attach_state_dict_hooks
from .store import BlockStore, span, span_elements
from .training import BlockTraining, Training

logger = logging.getLogger("fastvideo_offload")

def _param_names(model: nn.Module) -> dict[int, list[str]]:
    """Every name under which each parameter is registered (a tied weight has several)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _fine_tuned(model: nn.Module) -> bool:
    """In training mode with some parameters frozen (LoRA on a frozen base). Inference models can
    have frozen parameters too (FastVideo creates its linear weights frozen, its norms not), but
    loaders hand them over in eval mode, and training loops call train()."""
    return model.training and any(not p.requires_grad for p in model.parameters())


def _check_blocks_registered_once(model: nn.Module, lists: list[BlockList]) -> None:
    home = {id(block): name for _, blocks in lists for name, block in blocks}
    for name, module in model.named_modules(remove_duplicate=False):
        expected = home.get(id(module))
        if expected is not None and name != expected:
            raise ValueError(
                f"block {expected} is also registered as {name or 'the model itself'}; an offloaded block must "
                "belong to its list alone, or calls through the other name would run without its weights"
            )


def _block_params(model: nn.Module, blocks: list[tuple[str, nn.Module]],
                  names: dict[int, list[str]]) -> list[list[nn.Parameter]]:
    """Each block's offloaded parameters. A parameter is offloaded with its block only if every name
    it has lies inside that block; one shared with another block or with the rest of the model stays
    resident. In a model being fine-tuned, a block's trainable parameters (LoRA's) stay resident too:
    gradients and optimizers find them on the device (training.py)."""
    fine_tuned = _fine_tuned(model)
    return [
        [p for p in block.parameters()
         if all(n.startswith(path + ".") for n in names[id(p)]) and not (fine_tuned and p.requires_grad)]
        for path, block in blocks
    ]


def footprint(model: nn.Module) -> tuple[int, list[int]]:
    """What `enable(model)` would keep on the device for good (non-block weights and buffers) and
    each block's bytes, found without changing anything."""
    blocks = [named for _, named_blocks in find_block_lists(model) for named in named_blocks]
    block_params = _block_params(model, blocks, _param_names(model))
    offloaded = {id(p) for params in block_params for p in params}
    return _staying_bytes(model, offloaded), [BlockStore.nbytes(params) for params in block_params]


def _finalize_engine(engine: int) -> None:
    # The handle goes with its model, so no forward of it can still run: a block that an interrupted
    # forward left entered is released first (at exit too).
    _ops.engine_reset(engine)
    _ops.engine_destroy(engine)


class OffloadHandle:
    """What `enable` returns for one model: stats, weight changes, and `disable`.

    Built top-down, each room once: the plan (which parameters each block offloads, the checks, the
    device budget), the host stores, the engine that streams them, then the hooks."""

    def __init__(self, model: nn.Module, lists: list[BlockList], config: OffloadConfig,
                 source: LiveWeights | CheckpointWeights | node_share.NodeShare):
        # Weak: the model holds the handle (attribute, hooks), so a strong reference back would make
        # a cycle, and `del model` would free neither slots nor host memory until a GC pass.
        self._model_ref = weakref.ref(model)
        device = config.device
        self.block_paths = [path for path, _ in lists]

        # Everything is checked before anything changes: a refused model is left as it was.
        _check_blocks_registered_once(model, lists)
        source.check(model)
        self._source = source  # a node's shared store stays pinned as long as the handle lives
        self._budget: DeviceBudget | None = None
        blocks = [named for _, named_blocks in lists for named in named_blocks]
        # What can be in flight is bounded by the blocks: a deeper prefetch would only reserve more.
        prefetch = ring_slots(config.prefetch, len(blocks)) - 1
        if config.prefetch > max(prefetch, 1):
            logger.info("prefetch %d is cut to %d: no more blocks than that can be ahead of the running one",
                        config.prefetch, prefetch)
        #: The checked arguments this model was enabled with (prefetch as cut).
        self.config = config.replace(prefetch=prefetch)
        self._block_index = {id(block): index for index, (_, block) in enumerate(blocks)}
        names = _param_names(model)
        block_params = _block_params(model, blocks, names)
        for (path, _), params in zip(blocks, block_params):
            devices = {p.device for p in params}
            if len(devices) > 1:
                raise ValueError(f"block {path} has parameters on several devices ({sorted(map(str, devices))})")
        offloaded = {id(p) for params in block_params for p in params}
        kept = {id(p): p for _, block in blocks for p in block.parameters() if id(p) not in offloaded}
        trainable = sum(p.requires_grad for p in kept.values()) if _fine_tuned(model) else 0
        if trainable:
            logger.info("%d trainable block parameter(s) (LoRA's) stay resident on %s", trainable, device)
        if len(kept) > trainable:
            logger.info("%d parameter(s) shared outside a single block stay resident on %s", len(kept) - trainable,
                        device)
        formats.check(((names[id(p)][0], p) for params in block_params for p in params), device)
        report = OffloadReport.measure(model, lists, offloaded)
        if config.device_budget is not None:
            self._budget = DeviceBudget(model, device, [BlockStore.nbytes(params) for params in block_params],
                                        self.prefetch + 1, _staying_bytes(model, offloaded), config.device_budget)
        retained = RetainedCheck(
            [held for params in block_params for p in params for held in formats.holders(names[id(p)][0], p)]
        )

        # The models of a group take turns on the device, so one set of staging buffers serves them all.
        peers = registry.group_handles(config.group) if config.group is not None else []
        peer = next((h._engine for h in peers if h.device == device), 0)
        self._engine = _ops.engine_create(device, self.prefetch, config.staging_threads, peer)
        self._finalizer = weakref.finalize(self, _finalize_engine, self._engine)
        self._training = Training(self._engine, device)
        self._offloaded_params = [p for params in block_params for p in params]
        self._stores: list[BlockStore] = []
        self._hooks = Hooks()
        self._outside: OutsideCalls | None = None
        undo = _Undo(model, offloaded)
        try:
            pin = PinPlan(resolve_pin_budget(config.host_pin_budget), device.type == "cuda")
            self._pack_blocks(blocks, block_params, names, source, pin)
            self._move_resident(offloaded, source)
            self._attach_hooks(model, blocks, block_params, names, source)
        except BaseException:
            self._destroy_engine()
            self._hooks.remove()
            undo.restore(self._stores)
            self._stores.clear()
            raise
        del undo  # it holds device tensors until here; the check below sees what else does
        self._retained_bytes = retained.measure(blocks)
        if config.group is not None:
            registry.join_group(config.group, self)
        registry.attach(model, self)
        stats = self.stats()
        logger.info(
            "offloading %d blocks (%s) of %s: %.1f MiB in host memory, %d device slot(s) of %.1f MiB on %s",
            stats["blocks"], ", ".join(self.block_paths) or "<root>", type(model).__name__,
            stats["host_bytes"] / 2**20, self.prefetch + 1, stats["slot_bytes"] / 2**20, device,
        )
        report.log(type(model).__name__, device)

    def _attach_hooks(self, model: nn.Module, blocks, block_params, names, source) -> None:
        """Every hook this model gets, into the one set that `disable` (or a failed enable) removes."""
        # OutsideCalls belongs to the handle: its copy function holding the handle would be a cycle,
        # and `del model` would wait for a GC pass to free the engine.
        hooks, device = self._hooks, self.device
        for index, ((path, block), params) in enumerate(zip(blocks, block_params)):
            offloaded = [(names[id(p)][0], p) for p in params]
            block_training = BlockTraining(self._training, self._engine, index, path, offloaded, device.type)
            hooks.add(*attach_block_hooks(block, path, self._engine, index, device.type, block_training))
        host_views = {n: host for store in self._stores for p, host in store.host_weights() for n in names[id(p)]}
        hooks.add(*attach_state_dict_hooks(model, host_views, self._weights_changed,
                                           source if isinstance(source, node_share.NodeShare) else None))
        self._outside = OutsideCalls(
            blocks, {id(p): view for s in self._stores for p, view in zip(s.params, s.views)},
            lambda view: _on_device(view, device), hooks,
        )
        if self._budget is not None:
            self._budget.attach(model, self._engine, hooks)
        hooks.add(model.register_forward_pre_hook(eager(self._before_forward)))

    @property
    def device(self) -> torch.device:
        return self.config.device

    @property
    def prefetch(self) -> int:
        """The prefetch depth in use (after the cut)."""
        return self.config.prefetch

    @property
    def group(self) -> str | None:
        return self.config.group

    @property
    def _model(self) -> nn.Module | None:
        return self._model_ref()

    def _move_resident(self, offloaded: set[int], source) -> None:
        """Everything that is not a block parameter goes to the device and stays: embeddings,
        norms, heads, shared weights, and every buffer (RoPE caches included)."""
        with torch.no_grad():
            for module in self._model.modules():
                for p in module._parameters.values():
                    if p is not None and id(p) not in offloaded:
                        data = source.resident(p, self.device)
                        if data is not p:
                            assign(p, data)
                for name, buf in module._buffers.items():
                    if buf is not None:
                        module._buffers[name] = source.resident(buf, self.device)

    def _pack_blocks(self, blocks, block_params, names, source, pin: PinPlan) -> None:
        pinned = self.device.type == "cuda"
        target = self.device if pinned else None
        total = sum(BlockStore.nbytes(params) for params in block_params)
        stores = source.host_stores([([names[id(p)][0] for p in params], params) for params in block_params],
                                    pin, target)
        with contextlib.closing(stores), tqdm(total=total, unit="B", unit_scale=True, leave=False, disable=None,
                                              desc=f"fastvideo_offload: {source.label}") as progress:
            for path, _ in blocks:
                try:
                    store = next(stores)
                except Exception as exc:
                    if not is_allocation_failure(exc):
                        raise
                    obtained = sum(s.size for s in self._stores)
                    raise _out_of_host_memory(exc, path, pinned, total, obtained) from exc
                store.add_to(self._engine)
                self._stores.append(store)
                progress.update(store.size)

    def _weights_changed(self) -> None:
        _ops.engine_invalidate(self._engine)
        self._outside.refresh()

    def _before_forward(self, module, args) -> None:
        # No block can be running when the whole model starts: one still entered was left by an
        # interrupted forward (KeyboardInterrupt skips torch's always-called post-hooks).
        _ops.engine_reset(self._engine)
        self._training.release_all()
        if torch.is_autocast_enabled(self.device.type) and any(p.requires_grad for p in self._offloaded_params):
            # Low-precision copies cast outside a block (inside `mutate`, or by a block whose
            # post-hook a KeyboardInterrupt skipped) must not stand in for the weights now. Autocast
            # caches only the casts of leaves that require grad: with frozen offloaded weights (LoRA
            # training) the cache holds LoRA's casts, which two forwards in one region share as
            # they do without offload.
            torch.clear_autocast_cache()
        if self.group is not None:
            # The other models of the group give their device slots back (Wan2.2's idle expert).
            for other in registry.group_handles(self.group):
                if other is not self and other.device == self.device:
                    other.trim()

    def limit_device_memory(self, nbytes: int | None) -> None:
        """Caps the device bytes this model's slots take together (None: no cap). Past the cap
        prefetches are skipped; a block that must run frees the other slots first, and only a
        cap below one block raises torch.OutOfMemoryError."""
        byte_count("limit_device_memory", nbytes, none=True)
        _ops.engine_set_slot_budget(self._engine, -1 if nbytes is None else nbytes)

    def set_device_budget(self, nbytes: int) -> None:
        """A new device budget (bytes) from the next forward on: residency is planned again."""
        if self._budget is None:
            raise RuntimeError("set_device_budget: this model was enabled without device_budget")
        self._budget.set_budget(nbytes)

    def owns_block(self, module: nn.Module) -> bool:
        """Whether `module` is one of the blocks this handle offloads."""
        return id(module) in self._block_index

    @contextlib.contextmanager
    def mutate(self, *blocks: nn.Module) -> Iterator[None]:
        """Change offloaded weights (a LoRA merge, a hand edit): inside, the named blocks (all
        blocks when none are named) hold real weights on the device; on leaving normally,
        whatever they hold is written back to the host store, so the next forward and `disable`
        see it. On an exception nothing is written back.

        Shapes and dtypes must stay as they were. Run no forward inside: the blocks' weights are
        this scope's own copies until it ends.

        With `share=` the host store is the node's, and leaving is a collective of the share
        (share.NodeShare.change): every rank of the group runs the same mutate, in the same order,
        and makes the same change (as FastVideo's sequence-parallel ranks each merge the same LoRA).
        The node's leader writes its result once, after every rank has reached the end of its
        mutate; every rank's result must match the leader's (checksums), else nothing is written
        and every rank raises, as when one rank's change raised. A rank that mutates alone raises
        after share.CHANGE_TIMEOUT."""
        indices = [self._index_of(b) for b in blocks] if blocks else range(len(self._stores))
        shared = self._source if isinstance(self._source, node_share.NodeShare) else None
        _ops.engine_invalidate(self._engine)  # refuses while a block is running
        # Every copy is made before any parameter changes: one that fails (out of device memory)
        # leaves the model offloaded as it was.
        with torch.no_grad():
            copies = [
                (p, _on_device(view, self.device))
                for i in indices
                for p, view in zip(self._stores[i].params, self._stores[i].views)
            ]
        for p, data in copies:
            p.data = data
        del copies
        try:
            yield
        except BaseException as exc:
            # A change that failed half-way is not written back: the host store keeps its weights.
            for i in indices:
                _ops.engine_park(self._engine, i)
            if shared is not None:
                with contextlib.suppress(Exception):  # this rank raises its own error, whatever the others do
                    shared.change("mutate", None, failed=exc)
            raise
        problems, writes = [], []
        for i in indices:
            store = self._stores[i]
            for name, p, view in zip(store.names, store.params, store.views):
                if p.shape != view.shape or p.dtype != view.dtype:
                    problems.append(f"{name}: {view.dtype} {tuple(view.shape)} became {p.dtype} {tuple(p.shape)}")
                elif p.stride() == view.stride():
                    writes.append((name, span(view), span(p.detach())))
                elif _overlaps(view):
                    # Values laid out otherwise need not fit strides whose elements share memory.
                    problems.append(f"{name}: its strides {view.stride()} overlap and became {p.stride()}")
                else:
                    writes.append((name, view, p.detach()))

        def write():
            with torch.no_grad():
                for _, dst, src in writes:
                    dst.copy_(src)

        try:
            if shared is None:
                write()
            else:
                with torch.no_grad():
                    digest = [(name, node_share.checksum(src)) for name, _, src in writes] + problems
                shared.change("mutate", digest, write)
        finally:
            for i in indices:
                _ops.engine_park(self._engine, i)
        writes.clear()  # the copies on the device go now, not with this frame
        self._weights_changed()
        if problems:
            raise ValueError(
                "mutate: offloaded parameters must keep their shape and dtype (and strides that overlap, as an "
                "expanded parameter's do); these kept their old weights: "
                + "; ".join(problems)
            )

    def _index_of(self, block: nn.Module) -> int:
        index = self._block_index.get(id(block)) if self.enabled else None
        if index is None:
            raise ValueError(f"mutate: {type(block).__name__} is not one of this model's offloaded blocks")
        return index

    def stats(self) -> dict[str, int]:
        """Counters of the engine: blocks, host_bytes, h2d_bytes, uploads, prefetches,
        sync_loads, max_filled_ring_slots, device_bytes and more; `outside_resident_bytes`: the weights
        of block submodules kept on the device because they also run outside their block;
        `retained_bytes`: block memory that offloading could not free (see retained.py);
        `mapped_bytes`: staged blocks' bytes left in a checkpoint's mapped pages (checkpoint.py)."""
        stats = _ops.engine_stats(self._engine)
        stats["outside_resident_bytes"] = self._outside.nbytes() if self._outside else 0
        stats["retained_bytes"] = self._retained_bytes
        stats["mapped_bytes"] = sum(s.size for s in self._stores if s.gathered)
        return stats

    def trim(self) -> None:
        """Frees this model's device slots and pinned staging buffers until its next forward (an
        idle Wan2.2 expert)."""
        self._release_interrupted()
        self._training.release_all()
        _ops.engine_trim(self._engine)

    def _release_interrupted(self) -> None:
        """A forward interrupted by a KeyboardInterrupt (or another BaseException, for which torch
        skips even always-called post-hooks) leaves its block entered. Released here, unless some
        thread is still inside that block's forward: then the engine's refusal stands."""
        if not _ops.engine_stats(self._engine)["running_blocks"] or self._a_block_runs():
            return
        logger.info("a forward was interrupted inside a block: its block is released")
        _ops.engine_reset(self._engine)

    def _a_block_runs(self) -> bool:
        call = nn.Module._call_impl.__code__
        for frame in sys._current_frames().values():
            while frame is not None:
                if frame.f_code is call and id(frame.f_locals.get("self")) in self._block_index:
                    return True
                frame = frame.f_back
        return False

    def trace_staging(self, on: bool = True) -> None:
        """Starts (or stops) recording each piece the staging threads copy into the pinned ring;
        `staging_trace` reads what they recorded. On before any block is staged, it traces from the
        first fill."""
        _ops.engine_trace_staging(self._engine, on)

    def staging_trace(self) -> torch.Tensor:
        """Returns and clears what the staging threads recorded since the last call: an int64
        `[n, 4]` tensor, a row per piece (at most 4 MiB) copied into the ring, `(block, staging
        thread, start, end)`, the times in nanoseconds of CLOCK_MONOTONIC (`time.monotonic_ns()`),
        in the order the copies ended. At most 262144 rows per staging ring between reads."""
        return _ops.engine_staging_trace(self._engine)

    @property
    def enabled(self) -> bool:
        return self._finalizer.alive

    def disable(self, device: torch.device | str | None = None) -> None:
        """Removes the hooks and puts every parameter back on the device, bit-exact. `device`: where
        the block weights go instead (the CPU, straight from the host store, for a model that came
        from there); the other weights stay where enable put them."""
        target = self.device if device is None else torch.device(device)
        if not self.enabled:
            raise RuntimeError("offload is already disabled for this model")
        # Refuses while a block is running, and gives the slots' memory to the copies below.
        self.trim()
        # Every copy is made before anything changes: one that fails (out of device memory)
        # leaves the model offloaded and working.
        try:
            with torch.no_grad():
                restored = [
                    (p, _on_device(view, target))
                    for store in self._stores
                    for p, view in zip(store.params, store.views)
                ]
        except Exception as exc:
            raise _disable_failed(exc) from exc
        self._destroy_engine()
        for p, data in restored:
            p.data = data
        self._hooks.remove()
        self._outside = None  # its resident copies of submodules' weights go now
        self._stores.clear()
        self._source = None  # a node's share: its blocks are unpinned and unmapped now, not when the handle goes
        registry.detach(self._model, self)

    def _destroy_engine(self) -> None:
        if self._finalizer.alive:
            _ops.engine_destroy(self._engine)  # refuses while a block is running
            self._finalizer.detach()


class _Undo:
    """What a failed `enable` needs to leave the model exactly as it found it.

    Tensors on a device are kept until enable has succeeded: they are restored as the very same
    storage, with no copy, and keeping them costs nothing that was not already in use. Block
    parameters in host memory are not kept: holding them beside their host store would need the
    model's size twice in host memory, the very resource enable is short of. They are copied
    back out of their store, one block at a time."""

    def __init__(self, model: nn.Module, offloaded: set[int]):
        self.params: dict[int, tuple[nn.Parameter, torch.Tensor | None]] = {}
        for p in model.parameters():
            keep = id(p) not in offloaded or p.device.type != "cpu"
            # What the engine swaps: an offloaded wrapper subclass's inner tensors.
            for _, h in formats.holders("", p) if id(p) in offloaded else [("", p)]:
                self.params[id(h)] = (h, h.data if keep else None)
        self.buffers = [(m, name, buf) for m in model.modules() for name, buf in m._buffers.items()]

    def restore(self, stores: list[BlockStore]) -> None:
        with torch.no_grad():
            while stores:
                # Each store is dropped once its host parameters are copied out: one block extra at most.
                store = stores.pop()
                for p, view in zip(store.params, store.views):
                    if self.params[id(p)][1] is None:
                        p.data = _on_device(view, torch.device("cpu"))
            for p, data in self.params.values():
                if data is not None:
                    assign(p, data)
            for module, name, buf in self.buffers:
                module._buffers[name] = buf


def _staying_bytes(model: nn.Module, offloaded: set[int]) -> int:
    """Bytes of the weights and buffers that enable puts on the device to stay."""
    tensors = {id(p): p for p in model.parameters() if id(p) not in offloaded}
    tensors.update((id(b), b) for b in model.buffers())
    return sum(map(formats.nbytes, tensors.values()))  # a tensor subclass by its inner tensors


def _out_of_host_memory(exc: Exception, block: str, pinned: bool, total: int, obtained: int) -> Exception:
    """`exc` (a failed host allocation for `block`) with how much enable asked for and got."""
    kind = "pinned host" if pinned else "host"
    message = (
        f"enable: packing block {block} failed after obtaining {obtained} of the {total} bytes "
        f"({obtained / 2**30:.2f} of {total / 2**30:.2f} GiB) of {kind} memory that offloading this model needs; "
        "the model was left as it was. Free host memory (another model, another process), offload a smaller "
        "model, or raise the limit on this process's memory (a container's memory limit; for pinned memory "
        f"also `ulimit -l`). Cause: {exc}"
    )
    return _retold(exc, message)


def _disable_failed(exc: Exception) -> Exception:
    """`exc` (raised while copying the weights back) saying that nothing was changed."""
    message = (
        "disable failed while copying the weights back to the device; the model is still offloaded and works; "
        f"free device memory and call disable() again. Cause: {exc}"
    )
    return _retold(exc, message)


def _retold(exc: Exception, message: str) -> Exception:
    """An exception of `exc`'s type (so `except torch.OutOfMemoryError` still catches it) saying `message`."""
    try:
        return type(exc)(message)
    except Exception:  # an exception type that does not take a bare message
        return RuntimeError(message)


def _on_device(view: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A device copy of a host-store view with the same shape, strides and values. The span its
    strides reach is copied as one run of elements: a plain .to() would not keep strides with
    gaps, and an element-wise copy_ refuses overlapping ones (an expanded, stride-0 parameter)."""
    data = torch.empty_strided(view.shape, view.stride(), dtype=view.dtype, device=device)
    span(data).copy_(span(view))
    return data


def _overlaps(t: torch.Tensor) -> bool:
    """Whether some elements of `t` share memory (expanded, or fewer elements in its span than it has)."""
    return any(size > 1 and stride == 0 for size, stride in zip(t.shape, t.stride())) or span_elements(t) < t.numel()
