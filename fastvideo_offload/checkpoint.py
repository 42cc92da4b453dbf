"""A safetensors checkpoint as the source of `enable`'s weights: block tensors are read from the
files straight into their host buffers, the rest onto the device, so the model is never whole in
host memory.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor's
name to its dtype, shape and [begin, end) byte range after the header, then the bytes. Headers
are read and checked as safetensors checks them (the tensors tile the bytes after the header
exactly, every key once), then against the model, before anything changes; the bytes are read with
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
import stat
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
# safetensors reads no longer header: a malformed length field never makes a huge read.
_MAX_HEADER = 100_000_000
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
    stamp: tuple[int, ...]  # `file`'s identity, size and mtime when its header was read (_stamp)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the model."""


def read_header(file: str | os.PathLike) -> dict[str, Entry]:
    """The tensors of one safetensors file, refused where safetensors refuses them: each tensor
    inside the file, and together they tile the bytes after the header exactly."""
    file = str(file)
    fd, st = _open(file)
    try:
        prefix = os.pread(fd, 8, 0)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if length > _MAX_HEADER:
            raise CheckpointError(f"{file}: not a safetensors file: its header length field says {length} bytes, "
                                  f"more than safetensors reads ({_MAX_HEADER})")
        if length < 0 or 8 + length > st.st_size:
            raise CheckpointError(
                f"{file}: truncated or not a safetensors file: its header needs {8 + max(length, 0)} bytes, "
                f"the file has {st.st_size}"
            )
        raw = os.pread(fd, length, 8)
        if len(raw) != length:
            raise CheckpointError(f"{file}: truncated while its header was read")
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot be read ({exc})") from exc
    finally:
        os.close(fd)
    header = _parse_json(f"{file}: its header", raw)
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: not a safetensors file, its header is not a JSON object")
    metadata = header.get("__metadata__")
    if not (metadata is None or isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{file}: its __metadata__ is {_kind(metadata)}, where safetensors reads null or an "
                              "object of strings")
    entries = {}
    for key, info in header.items():
        if key != "__metadata__":
            entries[key] = _entry(file, key, info, 8 + length, st)
    _check_tiling(file, entries, 8 + length, st.st_size)
    return entries


def _entry(file: str, key: str, info, data_start: int, st: os.stat_result) -> Entry:
    try:
        dtype, shape, (begin, end) = _DTYPES.get(info["dtype"]), tuple(info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{file}: tensor {key}: malformed header entry {info!r}") from exc
    if dtype is None:
        raise CheckpointError(f"{file}: tensor {key} has dtype {info['dtype']!r}, which this reader does not know")
    # JSON's true and false are Python ints too; safetensors refuses them as sizes and offsets.
    if not all(type(n) is int and n >= 0 for n in (*shape, begin, end)):
        raise CheckpointError(f"{file}: tensor {key}: malformed header entry {info!r}")
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
        raise CheckpointError(f"{file}: tensor {key}: {end - begin} bytes for a {info['dtype']} tensor of shape "
                              f"{list(shape)} ({nbytes} bytes)")
    if data_start + end > st.st_size:
        raise CheckpointError(f"{file}: truncated: tensor {key} ends at byte {data_start + end}, the file has "
                              f"{st.st_size}")
    return Entry(key, file, dtype, shape, data_start + begin, nbytes, _stamp(st))


def _check_tiling(file: str, entries: dict[str, Entry], data_start: int, size: int) -> None:
    """In the order of their offsets, each tensor starts where the one before ends, and the last
    ends at the file's end: no two tensors share a byte (which would load one's weights into the
    other), and a header length that points into the header's own padding, which would shift
    every tensor, is refused. Empty tensors sort first at their offset, as safetensors sorts them."""
    end, previous = 0, None
    for e in sorted(entries.values(), key=lambda e: (e.offset, e.nbytes)):
        begin = e.offset - data_start
        if begin < end:
            raise CheckpointError(f"{file}: tensor {e.key}'s data_offsets [{begin}, {begin + e.nbytes}] overlap "
                                  f"tensor {previous.key}'s [{previous.offset - data_start}, {end}]")
        if begin > end:
            raise CheckpointError(f"{file}: a gap in the data: no tensor holds its bytes {end} to {begin}, before "
                                  f"tensor {e.key}")
        end, previous = begin + e.nbytes, e
    if data_start + end != size:
        raise CheckpointError(
            f"{file}: its tensors end at byte {data_start + end}, the file has {size}: bytes no tensor holds, or a "
            "header length that does not match the header"
        )


def _parse_json(what: str, raw: bytes):
    """`raw` read as safetensors reads a header: UTF-8 JSON with spaces, tabs and line breaks
    around it, no NaN or Infinity, and (stricter: there the last one wins) every key once."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except _DuplicateKey as exc:
        raise CheckpointError(f"{what} has the key {exc.args[0]!r} twice in one object: which one holds is "
                              "ambiguous") from None
    except RecursionError:
        raise CheckpointError(f"{what} is JSON nested too deeply to read") from None
    except ValueError as exc:  # not UTF-8, not JSON
        raise CheckpointError(f"{what} is not JSON ({exc})") from exc


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) < len(pairs):  # rare: the first key seen twice is named
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _kind(value) -> str:
    """A JSON value's type, as JSON names it."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _open(file: str) -> tuple[int, os.stat_result]:
    """A read-only descriptor of `file`, refused unless it is a regular file: opening a FIFO waits
    for a writer, forever if none comes, and a device may never end."""
    try:
        st = os.stat(file)
        if stat.S_ISREG(st.st_mode):
            # O_NONBLOCK: a FIFO put in its place after that check cannot block the open either.
            fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                return fd, st
            os.close(fd)
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot be opened ({exc.strerror})") from exc
    raise CheckpointError(f"{file}: not a regular file ({_file_type(st.st_mode)}): a checkpoint is read from files")


def _file_type(mode: int) -> str:
    for test, name in [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]:
        if test(mode):
            return name
    return "not a file"


def _stamp(st: os.stat_result) -> tuple[int, ...]:
    """A file by its inode, size and modification time: a truncated, extended or rewritten file
    does not match, and two paths to one file do."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


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
    weight_map = _weight_map(path)
    headers = {name: read_header(path.parent / name) for name in sorted(set(weight_map.values()))}
    entries = {}
    for key, name in weight_map.items():
        if key not in headers[name]:
            raise CheckpointError(f"checkpoint index {path}: names {key} in {path.parent / name}, which has no such "
                                  "tensor")
        entries[key] = headers[name][key]
    return entries


def _weight_map(path: Path) -> dict[str, str]:
    """An index's weight_map, each tensor's name to its file's name in the index's directory."""
    fd, st = _open(str(path))
    try:
        raw = os.pread(fd, st.st_size, 0)
    except OSError as exc:
        raise CheckpointError(f"checkpoint index {path}: cannot be read ({exc})") from exc
    finally:
        os.close(fd)
    index = _parse_json(f"checkpoint index {path}: the index", raw)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        got = f"a weight_map that is {_kind(weight_map)}" if isinstance(index, dict) and "weight_map" in index \
            else "no weight_map"
        raise CheckpointError(f"checkpoint index {path}: has {got}, where an index maps each tensor to its file "
                              "in a JSON object")
    for key, name in weight_map.items():
        if not isinstance(name, str):
            raise CheckpointError(f"checkpoint index {path}: names the file of tensor {key} as {name!r}, "
                                  f"{_kind(name)}, not a file name")
    return weight_map


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
        with _Files(self.entries.values()) as files, ThreadPoolExecutor(_threads(len(blocks))) as pool:
            mapped = _Mapped(files)
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
            return (*entry.stamp, entry.offset, str(entry.dtype))

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

    def __init__(self, files: _Files):
        self._files = files  # mapped through its descriptors: the files it checked are the files mapped
        self._bases: dict[str, torch.Tensor | None] = {}
        self.nbytes = 0

    def maps(self, file: str) -> bool:
        """Maps `file` if it is not yet; False (and its blocks are read instead) where it cannot be."""
        if file not in self._bases:
            try:
                pages = mmap.mmap(self._files.fd(file), 0, flags=mmap.MAP_PRIVATE,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as exc:
                logger.warning("%s cannot be mapped (%s): its staged blocks are read into host memory instead",
                               file, exc)
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
    """One read-only descriptor per file, shared by the reading threads (pread has no file
    position), each opened only if it is still the file whose header was read."""

    def __init__(self, entries):
        self._stamps = {e.file: e.stamp for e in entries}
        self._fds: dict[str, int] = {}

    def __enter__(self) -> _Files:
        try:
            for path, stamp in sorted(self._stamps.items()):
                self._fds[path], st = _open(path)
                if _stamp(st) != stamp:
                    how = (f"{stamp[2]} bytes then, {st.st_size} now" if st.st_size != stamp[2]
                           else "rewritten or replaced")
                    raise CheckpointError(f"{path}: changed since its header was read ({how}): read the checkpoint "
                                          "again (a new CheckpointWeights)")
        except BaseException:
            self.__exit__()
            raise
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
