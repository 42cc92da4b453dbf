"""A safetensors checkpoint as the source of `enable`'s weights: block tensors are read from the
files straight into their host buffers, the rest onto the device, so the model is never whole in
host memory.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor's
name to its dtype, shape and [begin, end) byte range after the header, then the bytes. Headers
are read and checked against the model before anything changes; the bytes are read with
os.preadv into the destination itself, or, where a cast or other strides are needed, into one
tensor's worth of scratch first. A block outside the pin budget whose tensors need no cast is not
read at all: its tensors stay in the file's pages, mapped, and the staging threads gather them
from there, so the page cache holds the only host copy."""

from __future__ import annotations

import ctypes
import json
import logging
import math
import mmap
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .pinning import PinPlan
from .sources import assign
from .store import BlockStore

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
# Linux reads at most this much in one call.
_MAX_READ = 0x7FFFF000
# Reading is mostly waiting on the disk and memcpy out of the page cache; more threads than this gain nothing.
_MAX_THREADS = 8

logger = logging.getLogger("fastvideo_offload")


@dataclass(frozen=True)
class Entry:
    """One tensor of a checkpoint: where its bytes are and what they hold."""

    key: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of its first byte in `file`
    nbytes: int


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the model."""


def read_header(file: str | os.PathLike) -> dict[str, Entry]:
    """The tensors of one safetensors file, each checked to lie inside the file."""
    file = str(file)
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            prefix = f.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if length < 0 or 8 + length > size:
                raise CheckpointError(
                    f"{file}: truncated or not a safetensors file: its header needs {8 + max(length, 0)} bytes, "
                    f"the file has {size}"
                )
            raw = f.read(length)
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot be read ({exc})") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: not a safetensors file, its header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: not a safetensors file, its header is not a JSON object")
    entries = {}
    for key, info in header.items():
        if key != "__metadata__":
            entries[key] = _entry(file, key, info, 8 + length, size)
    return entries


def _entry(file: str, key: str, info, data_start: int, size: int) -> Entry:
    try:
        dtype, shape, (begin, end) = _DTYPES.get(info["dtype"]), tuple(info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{file}: tensor {key}: malformed header entry {info!r}") from exc
    if dtype is None:
        raise CheckpointError(f"{file}: tensor {key} has dtype {info['dtype']!r}, which this reader does not know")
    if not all(isinstance(n, int) and n >= 0 for n in (*shape, begin, end)):
        raise CheckpointError(f"{file}: tensor {key}: malformed header entry {info!r}")
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
        raise CheckpointError(f"{file}: tensor {key}: {end - begin} bytes for a {info['dtype']} tensor of shape "
                              f"{list(shape)} ({nbytes} bytes)")
    if data_start + end > size:
        raise CheckpointError(f"{file}: truncated: tensor {key} ends at byte {data_start + end}, the file has {size}")
    return Entry(key, file, dtype, shape, data_start + begin, nbytes)


def read_checkpoint(path: str | os.PathLike | list[str | os.PathLike]) -> dict[str, Entry]:
    """Every tensor of a checkpoint: one .safetensors file, an index json (as diffusers'
    `save_pretrained` writes for sharded checkpoints), a directory holding one of them, or a list
    of .safetensors files (what FastVideo's loader globs)."""
    if isinstance(path, (list, tuple)):
        return _read_files(path)
    path = Path(path)
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        files = sorted(path.glob("*.safetensors"))
        if len(indexes) > 1 or (not indexes and len(files) > 1):
            found = [p.name for p in indexes or files]
            raise CheckpointError(f"checkpoint {path}: holds several checkpoints {found}; pass the one to load")
        if not indexes and not files:
            raise CheckpointError(f"checkpoint {path}: holds no .safetensors file and no .safetensors.index.json")
        path = indexes[0] if indexes else files[0]
    if path.suffix != ".json":
        return read_header(path)
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint index {path}: cannot be read as an index with a weight_map ({exc})") from exc
    headers = {name: read_header(path.parent / name) for name in sorted(set(weight_map.values()))}
    entries = {}
    for key, name in weight_map.items():
        if key not in headers[name]:
            raise CheckpointError(f"checkpoint index {path}: names {key} in {path.parent / name}, which has no such "
                                  "tensor")
        entries[key] = headers[name][key]
    return entries


def _read_files(files: list[str | os.PathLike]) -> dict[str, Entry]:
    if not files:
        raise CheckpointError("checkpoint: an empty list of files")
    entries: dict[str, Entry] = {}
    for file in files:
        for key, entry in read_header(file).items():
            if key in entries:
                raise CheckpointError(f"checkpoint: tensor {key} is in both {entries[key].file} and {entry.file}")
            entries[key] = entry
    return entries


class CheckpointWeights:
    """The weights of a safetensors checkpoint, for a model built on the meta device.

    `rename(key) -> name` maps each checkpoint key to the model's name for it (a loader's renames,
    as FastVideo's param_names_mapping); one that maps several keys to one name (a merge of tensors,
    which would need a copy in host memory) is refused."""

    label = "reading blocks from the checkpoint"

    def __init__(self, path: str | os.PathLike | list[str | os.PathLike], rename=None):
        self.path = ", ".join(map(os.fspath, path)) if isinstance(path, (list, tuple)) else os.fspath(path)
        self.entries = read_checkpoint(path)
        if rename is not None:
            self.entries = _renamed(self.entries, rename)
        self._by_tensor: dict[int, Entry] = {}

    def check(self, model: nn.Module) -> None:
        """Every tensor of the model's state_dict is in the checkpoint with its shape and a dtype it
        can be cast to, nothing else is there, and every tensor without a value is among them."""
        tensors: dict[int, tuple[torch.Tensor, list[str]]] = {}
        for name, t in model.state_dict(keep_vars=True).items():
            tensors.setdefault(id(t), (t, []))[1].append(name)
        real = [n for n, p in model.named_parameters() if not p.is_meta]
        if real:
            # A failed enable puts meta parameters back as they were; weights it overwrote could not be.
            raise CheckpointError(
                f"checkpoint=: the model must be built on the meta device (torch.device('meta') or accelerate's "
                f"init_empty_weights()), but parameters {_few(real)} hold weights already"
            )
        missing, problems, by_tensor = [], [], {}
        for t, names in tensors.values():
            # A tied weight is saved once, under any of its names.
            entry = next((self.entries[n] for n in names if n in self.entries), None)
            if entry is None:
                missing.append(names[0])
            elif entry.shape != tuple(t.shape):
                problems.append(f"{entry.key} in {entry.file}: shape {list(entry.shape)}, the model's is "
                                f"{list(t.shape)}")
            elif entry.dtype != t.dtype and not (entry.dtype.is_floating_point and t.dtype.is_floating_point):
                problems.append(f"{entry.key} in {entry.file}: dtype {entry.dtype} cannot be cast to the model's "
                                f"{t.dtype}")
            else:
                by_tensor[id(t)] = entry
        names = {n for _, ns in tensors.values() for n in ns}
        unexpected = [f"{k} in {e.file}" for k, e in self.entries.items() if k not in names]
        # Non-persistent buffers are never saved: built on meta, they have no value anywhere.
        unfilled = [n for n, t in _named_tensors(model) if t.is_meta and id(t) not in tensors]
        if missing:
            problems.append(f"missing from the checkpoint: {_few(missing)}")
        if unexpected:
            problems.append(f"not in the model: {_few(unexpected)}")
        if unfilled:
            problems.append(
                f"{_few(unfilled)} on the meta device and not saved in checkpoints (non-persistent buffers): build "
                "the model with accelerate's init_empty_weights(), which leaves buffers real"
            )
        if problems:
            raise CheckpointError(f"checkpoint {self.path} does not fit {type(model).__name__}: " + "; ".join(problems))
        self._by_tensor = by_tensor

    def host_stores(
        self, blocks: list[tuple[list[str], list[nn.Parameter]]], pin: PinPlan, device: torch.device | None
    ) -> Iterator[BlockStore]:
        # Which blocks are pinned is decided in block order, before the reads run in parallel.
        wants = [pin.want(BlockStore.nbytes(params)) for _, params in blocks]
        mapped = _Mapped()
        with _Files(self.entries.values()) as files, ThreadPoolExecutor(_threads(len(blocks))) as pool:
            futures = [
                None if not want and self._mappable(params, mapped)
                else pool.submit(self._read_block, files, names, params, pin, want, device)
                for (names, params), want in zip(blocks, wants)
            ]
            try:
                for index, ((names, params), future) in enumerate(zip(blocks, futures)):
                    if future is None:
                        store = BlockStore.gathered_from(names, params, [mapped.tensor(self._by_tensor[id(p)])
                                                                         for p in params])
                    else:
                        store = future.result()
                    self.adopt(store)
                    if index == len(blocks) - 1 and mapped.nbytes:  # before the last yield: the caller stops there
                        logger.info("%.1f MiB of staged blocks stay in the checkpoint's pages (mapped, copy-on-write): "
                                    "the page cache holds their only host copy; the files must not be changed in "
                                    "place while the model is offloaded", mapped.nbytes / 2**20)
                    yield store
            finally:
                # Stopped early (a failed block): blocks not started yet are not read at all.
                for future in futures:
                    if future is not None:
                        future.cancel()

    def _mappable(self, params: list[nn.Parameter], mapped: _Mapped) -> bool:
        """Whether a block's tensors can be used where the checkpoint holds them: no cast, each
        contiguous and at an offset its dtype can be viewed at, in a file that can be mapped."""
        for p in params:
            entry = self._by_tensor[id(p)]
            if entry.dtype != p.dtype or not p.is_contiguous() or entry.offset % p.element_size():
                return False
        return all(mapped.maps(self._by_tensor[id(p)].file) for p in params)

    def resident(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        entry = self._by_tensor.get(id(tensor))
        if entry is None:  # a real tensor the checkpoint does not hold (a non-persistent buffer)
            return tensor.to(device)
        with _Files([entry]) as files:
            value = _read(files, entry)
        return value.to(device=device, dtype=tensor.dtype)

    def fill(self, stores: list[BlockStore]) -> None:
        """Reads each block into a store someone else laid out (a node's shared region), blocks in
        parallel; the parameters stay on the meta device until `adopt`."""
        with _Files(self.entries.values()) as files, ThreadPoolExecutor(_threads(len(stores))) as pool:
            for future in [pool.submit(self._read_into_store, files, store) for store in stores]:
                future.result()

    def adopt(self, store: BlockStore) -> None:
        """The block's parameters leave the meta device for their views in `store`."""
        with torch.no_grad():
            for p, view in zip(store.params, store.views):
                assign(p, view)

    def identity(self, blocks: list[tuple[list[str], list[nn.Parameter]]]) -> list:
        """Where each block tensor's bytes are: ranks of a node that share one store agree on it
        instead of each reading the checkpoint to compare. A file is known by its inode, size and
        modification time, so two paths to one file agree and a rewritten file does not."""
        def where(p):
            entry = self._by_tensor[id(p)]
            st = os.stat(entry.file)
            return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, entry.offset, str(entry.dtype))

        return [[where(p) for p in params] for _, params in blocks]

    def _read_block(self, files, names, params, pin, want, device) -> BlockStore:
        store = pin.alloc(want, lambda pinned: BlockStore.allocate(names, params, pinned, device))
        self._read_into_store(files, store)
        return store

    def _read_into_store(self, files, store: BlockStore) -> None:
        for view, offset, p in zip(store.views, store.offsets, store.params):
            entry = self._by_tensor[id(p)]
            if entry.dtype == view.dtype and view.is_contiguous():
                _read_into(files, entry, store.buffer, offset)
            else:
                view.copy_(_read(files, entry))


def _renamed(entries: dict[str, Entry], rename) -> dict[str, Entry]:
    renamed: dict[str, Entry] = {}
    for key, entry in entries.items():
        name = rename(key)
        if not isinstance(name, str):
            raise CheckpointError(f"checkpoint: rename({key!r}) returned {name!r}, not a str")
        if name in renamed:
            raise CheckpointError(
                f"checkpoint: rename maps both {renamed[name].key} and {key} (in {entry.file}) to {name}: merging "
                "several tensors into one is not supported"
            )
        renamed[name] = entry
    return renamed


def _read(files: _Files, entry: Entry) -> torch.Tensor:
    """`entry`'s tensor, read into a new host tensor of its own dtype and shape."""
    raw = torch.empty(entry.nbytes, dtype=torch.uint8)
    _read_into(files, entry, raw, 0)
    return raw.view(entry.dtype).reshape(entry.shape)


def _read_into(files: _Files, entry: Entry, buffer: torch.Tensor, offset: int) -> None:
    """`entry`'s bytes into `buffer` (uint8, contiguous) from byte `offset` on."""
    done = 0
    address = buffer.data_ptr() + offset
    while done < entry.nbytes:
        n = min(entry.nbytes - done, _MAX_READ)
        target = memoryview((ctypes.c_char * n).from_address(address + done)).cast("B")
        try:
            got = os.preadv(files.fd(entry.file), [target], entry.offset + done)
        except OSError as exc:
            raise CheckpointError(f"{entry.file}: reading tensor {entry.key} failed ({exc})") from exc
        if got == 0:
            raise CheckpointError(f"{entry.file}: truncated: it ended after {done} of the {entry.nbytes} bytes of "
                                  f"tensor {entry.key}")
        done += got


class _Mapped:
    """Each checkpoint file mapped whole, private: reads come from the page cache's pages, and a
    write (load_state_dict, mutate) copies the page it touches for this process, never into the file."""

    def __init__(self):
        self._bases: dict[str, torch.Tensor | None] = {}
        self.nbytes = 0

    def maps(self, file: str) -> bool:
        """Maps `file` if it is not yet; False (and its blocks are read instead) where it cannot be."""
        if file not in self._bases:
            try:
                with open(file, "rb") as f:
                    pages = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as exc:
                logger.warning("%s cannot be mapped (%s): its staged blocks are read into host memory instead", file, exc)
                self._bases[file] = None
            else:
                # Through a memoryview, as share.py maps: nothing can unmap pages a tensor still views.
                self._bases[file] = torch.frombuffer(memoryview(pages), dtype=torch.uint8)
        return self._bases[file] is not None

    def tensor(self, entry: Entry) -> torch.Tensor:
        self.nbytes += entry.nbytes
        base = self._bases[entry.file]
        return base[entry.offset : entry.offset + entry.nbytes].view(entry.dtype).view(entry.shape)


class _Files:
    """One read-only descriptor per file, shared by the reading threads (pread has no file position)."""

    def __init__(self, entries):
        self._paths = sorted({e.file for e in entries})
        self._fds: dict[str, int] = {}

    def __enter__(self) -> _Files:
        try:
            for path in self._paths:
                self._fds[path] = os.open(path, os.O_RDONLY)
        except OSError as exc:
            self.__exit__()
            raise CheckpointError(f"{exc.filename}: cannot be opened ({exc.strerror})") from exc
        return self

    def fd(self, path: str) -> int:
        return self._fds[path]

    def __exit__(self, *exc_info) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _threads(blocks: int) -> int:
    return max(1, min(blocks, len(os.sched_getaffinity(0)), _MAX_THREADS))


def _few(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
