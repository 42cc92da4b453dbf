"""`enable(model, checkpoint=...)`: a model built on the meta device, loaded from safetensors files
straight into an offloaded model: the same outputs and state_dict as diffusers' from_pretrained,
casts, every bad checkpoint refused (as strictly as safetensors refuses it) with the model left on
meta, and the host memory it takes."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, save_model

import fastvideo_offload as fo
from support.needs import integration
from fastvideo_offload import checkpoint as ckpt
from support.models import TiedBlocks, TinyDiT, tiny_input

diffusers = integration("diffusers")
accelerate = integration("accelerate")

WAN = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=16, out_channels=16,
           text_dim=64, freq_dim=64, ffn_dim=128, num_layers=3, rope_max_seq_len=64)


def wan_inputs(dtype=torch.float32):
    return dict(hidden_states=torch.randn(1, 16, 4, 8, 8, dtype=dtype), timestep=torch.tensor([10]),
                encoder_hidden_states=torch.randn(1, 8, 64, dtype=dtype))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One random Wan model saved by diffusers twice: sharded (an index and several files) and as one file."""
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**WAN)
    root = tmp_path_factory.mktemp("wan")
    model.save_pretrained(root / "sharded", max_shard_size="200KB")
    model.save_pretrained(root / "single")
    return root


def empty_wan(dtype=torch.float32):
    with accelerate.init_empty_weights():
        model = diffusers.WanTransformer3DModel(**WAN)
    return model.to(dtype).eval()


def assert_on_meta(model):
    assert fo.handle_of(model) is None
    assert all(p.is_meta for p in model.parameters())


def test_a_sharded_save_has_an_index_and_several_files(saved):
    files = sorted(p.name for p in (saved / "sharded").iterdir())
    assert "diffusion_pytorch_model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 3


@pytest.mark.parametrize("where", [
    "sharded", "sharded/diffusion_pytorch_model.safetensors.index.json",
    "single", "single/diffusion_pytorch_model.safetensors",
])
def test_loads_bit_identical_to_from_pretrained(saved, where):
    reference = diffusers.WanTransformer3DModel.from_pretrained(saved / where.split("/")[0]).eval()
    model = empty_wan()
    params = list(model.parameters())
    handle = fo.enable(model, device="cpu", checkpoint=saved / where)
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))  # off meta, the same objects
    inputs = wan_inputs()
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(**inputs, return_dict=False)[0], reference(**inputs, return_dict=False)[0])
    got, expected = model.state_dict(), reference.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert all(p.numel() == 0 for p in model.blocks.parameters())
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert handle.stats()["retained_bytes"] == 0  # the meta tensors swapped out hold nothing
    # The host store is the one packing the loaded model gives, byte for byte (padding included).
    packed = fo.enable(reference, device="cpu")
    assert handle.stats()["host_bytes"] == packed.stats()["host_bytes"]
    for ours, theirs in zip(handle._stores, packed._stores):
        assert torch.equal(ours.buffer, theirs.buffer)
    handle.disable()
    with torch.no_grad():
        assert torch.equal(model(**inputs, return_dict=False)[0], reference(**inputs, return_dict=False)[0])


def test_a_rename_maps_the_files_keys_to_the_models(saved):
    """A loader's own names (FastVideo's: renames only): every key is renamed before the check,
    and a list of files (what FastVideo globs) is a checkpoint too."""
    reference = diffusers.WanTransformer3DModel.from_pretrained(saved / "sharded").eval()
    model = empty_wan()
    model.blocks.insert(0, model.blocks.pop(2))  # the model's block 0 is the file's block 2, and so on
    order = {"0": "1", "1": "2", "2": "0"}

    def rename(key):
        parts = key.split(".")
        return ".".join(["blocks", order[parts[1]], *parts[2:]]) if parts[0] == "blocks" else key

    files = sorted((saved / "sharded").glob("*.safetensors"))
    fo.enable(model, device="cpu", checkpoint=ckpt.CheckpointWeights(files, rename=rename))
    for ours, theirs in zip(model.blocks, [reference.blocks[2], reference.blocks[0], reference.blocks[1]]):
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))


def test_a_rename_that_merges_tensors_is_refused(saved):
    def merge(key):  # as a loader fusing q, k and v into one tensor would map them
        return key.replace(".to_k.", ".to_q.")

    with pytest.raises(ValueError, match=r"rename maps both blocks\.0\.attn1\.to_[qk]\.bias and "
                                         r"blocks\.0\.attn1\.to_[qk]\.bias .* merging several tensors"):
        ckpt.CheckpointWeights(saved / "sharded", rename=merge)


@pytest.mark.parametrize("saved_dtype,model_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_casts_to_the_models_dtype(tmp_path, saved_dtype, model_dtype):
    diffusers.WanTransformer3DModel(**WAN).to(saved_dtype).save_pretrained(tmp_path, max_shard_size="200KB")
    # Each tensor cast on its own (from_pretrained's torch_dtype would keep some modules in fp32).
    reference = diffusers.WanTransformer3DModel.from_pretrained(tmp_path).to(model_dtype).eval()
    model = empty_wan(model_dtype)
    fo.enable(model, device="cpu", checkpoint=tmp_path)
    assert model.dtype == model_dtype
    inputs = wan_inputs(model_dtype)
    with torch.no_grad():
        assert torch.equal(model(**inputs, return_dict=False)[0], reference(**inputs, return_dict=False)[0])
    got, expected = model.state_dict(), reference.state_dict()
    assert all(got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]) for k in expected)


def test_a_model_built_under_torch_device_meta_with_tied_weights(tmp_path):
    source = TiedBlocks()
    save_model(source, str(tmp_path / "tied.safetensors"))  # saves each tied weight once
    with torch.device("meta"):
        model = TiedBlocks()
    handle = fo.enable(model, device="cpu", checkpoint=tmp_path / "tied.safetensors")
    x = tiny_input()
    with torch.no_grad():
        assert torch.equal(model(x), source(x))
    assert model.head.weight is model.blocks[1].proj.weight
    # Its 64-byte norms leave padding in each buffer: zeroed, as packing zeroes it.
    packed = fo.enable(source, device="cpu")
    assert handle.stats()["host_bytes"] == packed.stats()["host_bytes"]
    for ours, theirs in zip(handle._stores, packed._stores):
        assert torch.equal(ours.buffer, theirs.buffer)


def test_a_non_persistent_buffer_left_on_meta_is_named(tmp_path):
    save_file(TinyDiT().state_dict(), str(tmp_path / "m.safetensors"))
    with torch.device("meta"):
        model = TinyDiT()
    with pytest.raises(ValueError, match=r"freqs on the meta device .*init_empty_weights"):
        fo.enable(model, device="cpu", checkpoint=tmp_path / "m.safetensors")
    assert_on_meta(model)


def test_a_model_with_real_weights_is_refused(saved):
    model = diffusers.WanTransformer3DModel(**WAN)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="must be built on the meta device"):
        fo.enable(model, device="cpu", checkpoint=saved / "single")
    assert fo.handle_of(model) is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def rewrite(saved, tmp_path, change):
    """A copy of the sharded checkpoint with `change(tensors)` applied to the shard that holds blocks.1's
    first weight; returns that copy's directory and the changed file's path."""
    target = tmp_path / "ckpt"
    shutil.copytree(saved / "sharded", target)
    index = json.loads((target / "diffusion_pytorch_model.safetensors.index.json").read_text())
    file = target / index["weight_map"]["blocks.1.attn1.to_q.weight"]
    tensors = load_file(file)
    change(tensors, index)
    save_file(tensors, str(file))
    (target / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return target, file


def drop(tensors, index):
    del tensors["blocks.1.attn1.to_q.weight"]
    del index["weight_map"]["blocks.1.attn1.to_q.weight"]


def add(tensors, index):
    tensors["blocks.1.extra"] = torch.zeros(3)
    index["weight_map"]["blocks.1.extra"] = index["weight_map"]["blocks.1.attn1.to_q.weight"]


def reshape(tensors, index):
    tensors["blocks.1.attn1.to_q.weight"] = tensors["blocks.1.attn1.to_q.weight"][:, :8].contiguous()


def to_int(tensors, index):
    tensors["blocks.1.attn1.to_q.weight"] = tensors["blocks.1.attn1.to_q.weight"].to(torch.int32)


@pytest.mark.parametrize("change,message", [
    (drop, r"missing from the checkpoint: blocks\.1\.attn1\.to_q\.weight"),
    (add, r"not in the model: blocks\.1\.extra in .*\.safetensors"),
    (reshape, r"blocks\.1\.attn1\.to_q\.weight in .*\.safetensors: shape \[64, 8\], the model's is \[64, 64\]"),
    (to_int, r"blocks\.1\.attn1\.to_q\.weight in .*\.safetensors: dtype torch\.int32 cannot be cast to the "
             r"model's torch\.float32"),
], ids=["missing", "unexpected", "shape", "dtype"])
def test_a_checkpoint_that_does_not_fit_is_refused(saved, tmp_path, change, message):
    target, _ = rewrite(saved, tmp_path, change)
    model = empty_wan()
    with pytest.raises(ValueError, match=message):
        fo.enable(model, device="cpu", checkpoint=target)
    assert_on_meta(model)


def test_a_truncated_file_is_named_with_its_tensor(saved, tmp_path):
    target, file = rewrite(saved, tmp_path, lambda tensors, index: None)
    os.truncate(file, os.path.getsize(file) - 100)
    model = empty_wan()
    with pytest.raises(ValueError, match=rf"{file}: truncated: tensor \S+ ends at byte \d+, the file has \d+"):
        fo.enable(model, device="cpu", checkpoint=target)
    assert_on_meta(model)
    os.truncate(file, 5)
    with pytest.raises(ValueError, match=rf"{file}: truncated or not a safetensors file"):
        fo.enable(model, device="cpu", checkpoint=target)
    assert_on_meta(model)


@pytest.mark.parametrize("contents,message", [
    (None, "holds no .safetensors file"), (["a.safetensors", "b.safetensors"], "holds several checkpoints"),
])
def test_a_directory_without_one_checkpoint_is_refused(tmp_path, contents, message):
    for name in contents or ():
        save_file({"x": torch.zeros(1)}, str(tmp_path / name))
    with pytest.raises(ValueError, match=message):
        fo.enable(empty_wan(), device="cpu", checkpoint=tmp_path)


@pytest.mark.parametrize("key", ["blocks.2.ffn.net.2.weight", "proj_out.weight"], ids=["last-block", "resident"])
def test_a_read_that_fails_midway_leaves_the_model_on_meta(saved, monkeypatch, key):
    """Failing in the last block (the others are in their stores and the engine by then) or in a
    weight outside the blocks (read after every block)."""
    read = ckpt._read_into

    def failing(files, entry, buffer, offset):
        if entry.key == key:
            raise ckpt.CheckpointError(f"{entry.file}: reading tensor {entry.key} failed (injected)")
        read(files, entry, buffer, offset)

    monkeypatch.setattr(ckpt, "_read_into", failing)
    model = empty_wan()
    buffers = dict(model.named_buffers())
    with pytest.raises(ValueError, match=rf"reading tensor {key} failed \(injected\)"):
        fo.enable(model, device="cpu", checkpoint=saved / "sharded")
    assert_on_meta(model)
    assert all(b is buffers[k] for k, b in model.named_buffers())
    monkeypatch.undo()
    fo.enable(model, device="cpu", checkpoint=saved / "sharded")  # and it loads once the files read
    assert not any(p.is_meta for p in model.parameters())


RSS_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import torch, accelerate, diffusers
    import fastvideo_offload as fo

    def kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    with accelerate.init_empty_weights():
        model = diffusers.WanTransformer3DModel(**json.loads(sys.argv[2]))
    before = kib("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    start = time.perf_counter()
    handle = fo.enable(model, device="cpu", checkpoint=sys.argv[1])
    seconds = time.perf_counter() - start
    resident = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    print(json.dumps(dict(before=before, peak=kib("VmHWM:"), host=handle.stats()["host_bytes"],
                          resident=resident, seconds=seconds)))
""")


@pytest.mark.sync_pass_only
def test_peak_host_memory_while_loading_is_the_host_store(tmp_path):
    """~200 MB of blocks, measured by the OS in a fresh process: the load adds at most the host
    store + 5% (scratch for casts, thread stacks, malloc arenas) + the resident weights (on a CPU
    device they live in host memory too) + 8 MiB for the Python objects it makes."""
    config = dict(WAN, num_attention_heads=8, attention_head_dim=64, ffn_dim=2048, num_layers=12)
    diffusers.WanTransformer3DModel(**config).save_pretrained(tmp_path, max_shard_size="50MB")
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path), json.dumps(config)],
                         capture_output=True, text=True, check=True, timeout=300)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["host"] > 190e6
    assert m["peak"] - m["before"] <= 1.05 * m["host"] + m["resident"] + 8 * 2**20, m


def test_checkpoint_weights_is_exported():
    assert fo.CheckpointWeights is ckpt.CheckpointWeights
    assert "CheckpointWeights" in fo.__all__


def tiny(path):
    """TinyDiT saved by safetensors at `path`, and one built on meta to load it (buffers real)."""
    reference = TinyDiT(layers=3).eval()
    save_file(reference.state_dict(), str(path))
    with accelerate.init_empty_weights():
        model = TinyDiT(layers=3).eval()
    return reference, model


def split(path):
    """A safetensors file's header, read as JSON, and its data."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def write(path, header, data: bytes, length: int | None = None) -> None:
    """A safetensors file: `header` a dict or the JSON text itself; `length`: another length field."""
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes((len(text) if length is None else length).to_bytes(8, "little") + text + data)


A, B = "blocks.0.proj.weight", "blocks.1.proj.weight"  # one shape: each could stand in for the other


def overlap(path):  # B starts 64 bytes into the tensor before it
    header, data = split(path)
    header[B]["data_offsets"] = [n - 64 for n in header[B]["data_offsets"]]
    write(path, header, data)


def equal(path):  # B's entry names A's bytes
    header, data = split(path)
    header[B]["data_offsets"] = header[A]["data_offsets"]
    write(path, header, data)


def gap(path):  # 64 bytes no tensor holds before B: its bytes and those after it move on
    header, data = split(path)
    begin = header[B]["data_offsets"][0]
    for info in header.values():
        if isinstance(info, dict) and "data_offsets" in info and info["data_offsets"][0] >= begin:
            info["data_offsets"] = [n + 64 for n in info["data_offsets"]]
    write(path, header, data[:begin] + bytes(64) + data[begin:])


def short(path):  # bytes after the last tensor
    with open(path, "ab") as f:
        f.write(bytes(64))


def duplicate(path):
    """A and B each twice, the second time swapped: with the last one winning (as safetensors reads
    it) the tensors still tile the data, and blocks 0 and 1 swap their proj weights."""
    header, data = split(path)
    text = json.dumps(header)
    write(path, text[:-1] + f', "{A}": {json.dumps(header[B])}, "{B}": {json.dumps(header[A])}}}', data)


def into_padding(path):
    """The length field counts the JSON without the spaces safetensors padded it with: the JSON still
    reads, and every tensor would be read that many bytes early."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    json_length = len(raw[8 : 8 + length].rstrip(b" "))
    assert json_length < length  # the header is padded
    path.write_bytes(json_length.to_bytes(8, "little") + raw[8:])


@pytest.mark.parametrize("change,ours,theirs", [
    (overlap, rf"tensor {B}'s data_offsets \[51008, 55104\] overlap tensor blocks\.1\.proj\.bias's \[50944, 51072\]",
     rf"invalid offset for tensor `{B}`"),
    (equal, rf"tensor {B}'s data_offsets \[17152, 21248\] overlap tensor {A}'s \[17152, 21248\]",
     r"invalid offset for tensor `blocks\.[01]\.proj\.weight`"),  # safetensors: either, as its map orders them
    (gap, rf"a gap in the data: no tensor holds its bytes 51072 to 51136, before tensor {B}",
     rf"invalid offset for tensor `{B}`"),
    (short, r"its tensors end at byte 106712, the file has 106776: bytes no tensor holds",
     r"incomplete metadata, file not fully covered"),
    (duplicate, rf"its header has the key '{A}' twice in one object", None),
    (into_padding, r"its tensors end at byte 106705, the file has 106712: .*a header length that does not match",
     r"incomplete metadata, file not fully covered"),
], ids=["overlap", "equal", "gap", "not-to-the-end", "duplicate-key", "length-into-padding"])
def test_a_malformed_header_is_refused_as_safetensors_refuses_it(tmp_path, change, ours, theirs):
    path = tmp_path / "m.safetensors"
    reference, model = tiny(path)
    change(path)
    with pytest.raises(ckpt.CheckpointError, match=rf"^{re.escape(str(path))}: {ours}"):
        fo.enable(model, device="cpu", checkpoint=path)
    assert_on_meta(model)
    if theirs is not None:
        with pytest.raises(SafetensorError, match=theirs):
            load_file(path)
    else:  # safetensors keeps the last of each: the weights swapped, silently
        loaded = load_file(path)
        assert torch.equal(loaded[A], reference.blocks[1].proj.weight)
        assert torch.equal(loaded[B], reference.blocks[0].proj.weight)


def tensor(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


U8 = {"a": tensor("U8", [16], 0, 16), "b": tensor("U8", [16], 16, 32)}
U8_JSON = json.dumps(U8)
DUP = '{"a": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]}, '


@pytest.mark.parametrize("header,accepted", [
    ({"b": U8["b"], "a": U8["a"]}, True),  # in any order in the JSON
    ({**U8, "e": tensor("U8", [0], 32, 32), "f": tensor("U8", [2, 0], 32, 32)}, True),  # empty, at the end
    ({"e": tensor("U8", [0], 16, 16), **U8}, True),  # empty, where another starts
    ({**U8, "e": tensor("U8", [0], 4, 4)}, False),  # empty, inside another
    ({**U8, "__metadata__": None}, True),
    ({**U8, "__metadata__": {"format": "pt"}}, True),
    ({**U8, "__metadata__": {"format": 1}}, False),
    ({**U8, "__metadata__": ["pt"]}, False),
    ({"a": U8["a"], "b": {**U8["b"], "extra": 1}}, True),
    ({"a": U8["a"], "b": tensor("U8", [True, 16], 16, 32)}, False),  # true is not a size
    ({"a": U8["a"], "b": tensor("U8", [16.0], 16, 32)}, False),
    ({"a": U8["a"], "b": {**U8["b"], "data_offsets": [16, 32, 32]}}, False),
    ({"a": U8["a"], "b": tensor("U8", [0], 32, 16)}, False),
    ({"a": U8["a"], "b": {**U8["b"], "extra": float("nan")}}, False),  # JSON has no NaN, even where unread
    (DUP + '"b": {"dtype": "U8", "dtype": "U8", "shape": [16], "data_offsets": [16, 32]}}', False),
    (U8_JSON[:-1] + ', "__metadata__": {}, "__metadata__": {}}', False),
    (U8_JSON + "   \t\r\n ", True),  # what a JSON reader skips, and so safetensors: its padding
    (" \n" + U8_JSON, True),
    (U8_JSON + "\x00" * 4, False),
    (U8_JSON + "\x0c", False),
    (U8_JSON + "\u00a0", False),
    ("\ufeff" + U8_JSON, False),
    ("[" * 100_000 + "]" * 100_000, False),
], ids=["any-order", "empty-at-the-end", "empty-where-another-starts", "empty-inside-another", "metadata-null",
        "metadata-strings", "metadata-number", "metadata-list", "extra-field", "true-as-size", "float-size",
        "three-offsets", "end-before-begin", "nan", "field-twice", "metadata-twice", "trailing-whitespace",
        "leading-whitespace", "trailing-nul", "trailing-form-feed", "trailing-nbsp", "bom", "nested"])
def test_a_header_reads_as_safetensors_reads_it(tmp_path, header, accepted):
    """Crafted headers over 32 bytes of data: each accepted or refused by both readers, and where
    accepted, the same tensors."""
    path = tmp_path / "x.safetensors"
    write(path, header, bytes(range(32)))
    try:
        theirs = load_file(path)
    except SafetensorError:
        theirs = None
    assert (theirs is not None) == accepted
    if not accepted:
        with pytest.raises(ckpt.CheckpointError, match=rf"^{re.escape(str(path))}: "):
            ckpt.read_header(path)
        return
    raw = path.read_bytes()
    ours = {k: torch.tensor(list(raw[e.offset : e.offset + e.nbytes]), dtype=torch.uint8).reshape(e.shape)
            for k, e in ckpt.read_header(path).items()}
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("header", [
    DUP + '"a": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]}}',
    U8_JSON[:-1] + ', "__metadata__": {"x": "1", "x": "2"}}',
], ids=["one-tensor-twice", "metadata-key-twice"])
def test_a_key_twice_is_refused_where_safetensors_keeps_the_last(tmp_path, header):
    """Stricter than safetensors: a key twice in one object is ambiguous even where both say the same."""
    path = tmp_path / "x.safetensors"
    write(path, header, bytes(range(32 if "__metadata__" in header else 16)))
    load_file(path)
    with pytest.raises(ckpt.CheckpointError, match=r"its header has the key '(a|x)' twice in one object"):
        ckpt.read_header(path)


def test_a_header_longer_than_safetensors_reads_is_refused_unread(tmp_path):
    path = tmp_path / "x.safetensors"
    with open(path, "wb") as f:
        f.write((100_000_001).to_bytes(8, "little"))
        f.truncate(200_000_000)  # sparse: the header would fit
    with pytest.raises(ckpt.CheckpointError,
                       match=rf"^{re.escape(str(path))}: not a safetensors file: its header length "
                             r"field says 100000001 bytes, more than safetensors reads"):
        ckpt.read_header(path)
    with pytest.raises(SafetensorError, match="header too large"):
        load_file(path)


def with_index(saved, tmp_path, change):
    """A copy of the sharded checkpoint whose index's text is `change(index)`."""
    target = tmp_path / "ckpt"
    shutil.copytree(saved / "sharded", target)
    path = target / "diffusion_pytorch_model.safetensors.index.json"
    path.write_text(change(json.loads(path.read_text())))
    return path


@pytest.mark.parametrize("change,message", [
    (lambda index: json.dumps({**index, "weight_map": list(index["weight_map"])}),
     r"has a weight_map that is a list, where an index maps each tensor to its file in a JSON object"),
    (lambda index: json.dumps({**index, "weight_map": None}), r"has a weight_map that is null"),
    (lambda index: json.dumps({"metadata": index["metadata"]}), r"has no weight_map"),
    (lambda index: json.dumps([index]), r"has no weight_map"),
    (lambda index: json.dumps({**index, "weight_map": {**index["weight_map"], "blocks.1.attn1.to_q.weight": 5}}),
     r"names the file of tensor blocks\.1\.attn1\.to_q\.weight as 5, a number, not a file name"),
    (lambda index: '{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}",
     r"the index is JSON nested too deeply to read"),
    (lambda index: json.dumps(index)[:-1] + ', "weight_map": {}}',
     r"the index has the key 'weight_map' twice in one object"),
], ids=["list", "null", "missing", "not-an-object", "non-string-file", "nested", "duplicate-key"])
def test_a_malformed_index_is_refused(saved, tmp_path, change, message):
    path = with_index(saved, tmp_path, change)
    model = empty_wan()
    with pytest.raises(ckpt.CheckpointError, match=rf"^checkpoint index {re.escape(str(path))}: {message}"):
        fo.enable(model, device="cpu", checkpoint=path)
    assert_on_meta(model)


def test_a_deeply_nested_header_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    _, model = tiny(path)
    write(path, '{"a": ' * 100_000 + "1" + "}" * 100_000, b"")
    with pytest.raises(ckpt.CheckpointError, match=rf"^{re.escape(str(path))}: its header is JSON nested too deeply"):
        fo.enable(model, device="cpu", checkpoint=path)
    assert_on_meta(model)
    with pytest.raises(SafetensorError, match="recursion limit exceeded"):
        load_file(path)


@pytest.mark.parametrize("host_pin_budget", [0, None], ids=["staged-mapped", "pinned-read"])
def test_a_file_truncated_after_its_header_was_read_is_refused(tmp_path, host_pin_budget):
    """Between CheckpointWeights(path) and enable the file loses its second half (blocks 1 and 2)."""
    path = tmp_path / "m.safetensors"
    _, model = tiny(path)
    weights = fo.CheckpointWeights(path)
    size = path.stat().st_size
    os.truncate(path, size // 2)
    with pytest.raises(ckpt.CheckpointError, match=rf"^{re.escape(str(path))}: changed since its header was read "
                                                   rf"\({size} bytes then, {size // 2} now\)"):
        fo.enable(model, device="cpu", checkpoint=weights, host_pin_budget=host_pin_budget)
    assert_on_meta(model)


def test_a_file_replaced_after_its_header_was_read_is_refused(tmp_path):
    """Another file of the same size put in its place (as a save that writes and renames does)."""
    path = tmp_path / "m.safetensors"
    _, model = tiny(path)
    weights = fo.CheckpointWeights(path)
    torch.manual_seed(1)
    save_file(TinyDiT(layers=3).state_dict(), str(tmp_path / "new.safetensors"))
    os.replace(tmp_path / "new.safetensors", path)
    with pytest.raises(ckpt.CheckpointError, match=rf"^{re.escape(str(path))}: changed since its header was read "
                                                   r"\(rewritten or replaced\)"):
        fo.enable(model, device="cpu", checkpoint=weights, host_pin_budget=0)
    assert_on_meta(model)


class Unblock:
    """Opens (and closes) `fifo`'s writing end after `seconds`: an open() waiting for a writer then
    returns and reads an empty file, so a missing check fails the test instead of hanging it."""

    def __init__(self, fifo, seconds: float = 10):
        self._timer = threading.Timer(seconds, self._release, args=(fifo,))

    @staticmethod
    def _release(fifo):
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # ENXIO: nobody waits to read it
            pass

    def __enter__(self):
        self._timer.start()

    def __exit__(self, *exc_info):
        self._timer.cancel()
        self._timer.join()


@pytest.mark.parametrize("where", ["file", "shard", "list"])
def test_a_fifo_is_refused_before_it_is_opened(saved, tmp_path, where):
    target = tmp_path / "ckpt"
    shutil.copytree(saved / "sharded", target)
    index = target / "diffusion_pytorch_model.safetensors.index.json"
    shards = sorted(target.glob("*.safetensors"))
    fifo = tmp_path / "m.safetensors" if where == "file" else shards[1]
    if where != "file":
        fifo.unlink()
    os.mkfifo(fifo)
    checkpoint = {"file": fifo, "shard": index, "list": shards}[where]
    model = empty_wan()
    with Unblock(fifo), pytest.raises(ckpt.CheckpointError, match=rf"^{re.escape(str(fifo))}: not a regular file "
                                                                  r"\(a FIFO\)"):
        fo.enable(model, device="cpu", checkpoint=checkpoint)
    assert_on_meta(model)
