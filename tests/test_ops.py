"""The C++ ops one by one: layouts, packing, the engine's handle checks, and torch's opcheck."""

import pytest
import torch

import fastvideo_offload  # noqa: F401  (registers the ops)
from support.needs import requires_cuda
from fastvideo_offload import _ops

ops = torch.ops.fastvideo_offload


def test_layout_aligns_every_offset_and_sizes_exactly():
    tensors = [torch.zeros(3, dtype=torch.uint8), torch.zeros(10, 10), torch.zeros(0),
               torch.zeros(1, dtype=torch.bfloat16)]
    offsets, total = _ops.layout(tensors)
    assert offsets == [0, 256, 768, 768]
    assert total == 768 + 2
    offsets, total = _ops.layout(tensors, 1024)
    assert offsets == [0, 1024, 2048, 2048] and total == 2050


def test_layout_keeps_strides_of_non_contiguous_tensors():
    gapped = torch.zeros(4, 8)[:, ::2]  # last element is 4*8-2 elements from the first
    offsets, total = _ops.layout([gapped])
    assert total == (3 * 8 + 3 * 2 + 1) * 4


def test_pack_copies_each_tensor_to_its_offset():
    a = torch.arange(6, dtype=torch.float32).view(2, 3)
    b = torch.arange(8, dtype=torch.int16).view(4, 2).t()
    offsets, total = _ops.layout([a, b])
    buffer = _ops.pack([a, b], offsets, total, False)
    assert buffer.dtype == torch.uint8 and buffer.numel() == total and not buffer.is_pinned()
    assert torch.equal(buffer[offsets[0] : offsets[0] + 24].view(torch.float32), a.flatten())
    back = torch.empty(0, dtype=torch.int16).set_(buffer.untyped_storage(), offsets[1] // 2, b.shape, b.stride())
    assert torch.equal(back, b)


def test_pack_is_threaded_for_large_blocks():
    big = [torch.randn(3 << 20), torch.randn(1 << 20)]  # 16 MiB: several 4 MiB pieces
    offsets, total = _ops.layout(big)
    buffer = _ops.pack(big, offsets, total, False)
    assert torch.equal(buffer[: 12 << 20].view(torch.float32), big[0])
    assert torch.equal(buffer[offsets[1] :].view(torch.float32), big[1])


@pytest.mark.parametrize(
    "offsets, nbytes, match",
    [
        ([0, 100], 2000, "multiple of 256"),
        ([0, -256], 2000, "multiple of 256"),
        ([0, 256], 300, "does not fit"),
        ([0, 0], 2000, "overlap"),
        ([0], 2000, "2 tensors but 1 offsets"),
        ([0, 256], -1, ">= 0"),
    ],
)
def test_pack_rejects_bad_layouts(offsets, nbytes, match):
    tensors = [torch.zeros(16), torch.zeros(16)]
    with pytest.raises(ValueError, match=match):
        _ops.pack(tensors, offsets, nbytes, False)


def test_layout_rejects_bad_alignment():
    with pytest.raises(ValueError, match="power of two"):
        _ops.layout([torch.zeros(1)], 300)
    with pytest.raises(ValueError, match=r"power of two in \[256, 1073741824\], got 4611686018427387904"):
        _ops.layout([torch.zeros(1)], 2**62)


def test_layout_refuses_sizes_no_int64_counts():
    """Meta tensors take no memory: together they may span more than an int64 counts, which must
    not wrap around into a small layout."""
    half = torch.empty(2**61, dtype=torch.uint8, device="meta")
    with pytest.raises(ValueError, match="span more bytes than an int64 counts"):
        _ops.layout([half, half, half, half])


@pytest.mark.parametrize("prefetch", [2**31 - 1, 2**32 - 1, 2**63 - 1])
def test_an_engine_cuts_its_prefetch_to_the_blocks(prefetch):
    engine = _ops.engine_create(torch.device("cpu"), prefetch)
    params = [torch.nn.Parameter(torch.randn(8)) for _ in range(3)]
    values = [p.detach().clone() for p in params]
    try:
        for p in params:
            offsets, total = _ops.layout([p.detach()])
            _ops.engine_add_block(engine, _ops.pack([p.detach()], offsets, total, False), [p], offsets)
        for _ in range(2):
            for b, value in enumerate(values):
                ops.engine_enter(engine, b)
                assert torch.equal(params[b], value)
                ops.engine_exit(engine, b)
        assert _ops.engine_stats(engine)["prefetch"] == 2
    finally:
        _ops.engine_destroy(engine)


def test_engine_rejects_unknown_handles_and_blocks():
    with pytest.raises(ValueError, match="no offload engine with handle"):
        ops.engine_enter(123456, 0)
    engine = _ops.engine_create(torch.device("cpu"), 1)
    try:
        with pytest.raises(IndexError, match="block 0 does not exist"):
            ops.engine_enter(engine, 0)
        with pytest.raises(IndexError, match="block -1 does not exist"):
            ops.engine_exit(engine, -1)
        assert _ops.engine_order(engine) == []
    finally:
        _ops.engine_destroy(engine)
    with pytest.raises(ValueError, match="already destroyed"):
        _ops.engine_stats(engine)
    with pytest.raises(ValueError, match="already destroyed"):
        _ops.engine_order(engine)


def test_the_staging_trace_ops_check_their_engine():
    with pytest.raises(ValueError, match="no offload engine with handle"):
        _ops.engine_trace_staging(123456, True)
    with pytest.raises(ValueError, match="no offload engine with handle"):
        _ops.engine_staging_trace(123456)
    engine = _ops.engine_create(torch.device("cpu"), 1)
    try:
        _ops.engine_trace_staging(engine, True)
        trace = _ops.engine_staging_trace(engine)  # no staged block, so no staging ring
        assert trace.shape == (0, 4) and trace.dtype == torch.int64
    finally:
        _ops.engine_destroy(engine)


def test_engine_rejects_bad_arguments():
    with pytest.raises(ValueError, match="prefetch must be >= 0"):
        _ops.engine_create(torch.device("cpu"), -2)
    with pytest.raises(ValueError, match="cpu or cuda"):
        _ops.engine_create(torch.device("meta"), 1)
    engine = _ops.engine_create(torch.device("cpu"), 1)
    p = torch.nn.Parameter(torch.randn(4, 4))
    offsets, total = _ops.layout([p.detach()])
    host = _ops.pack([p.detach()], offsets, total, False)
    try:
        with pytest.raises(ValueError, match="contiguous 1-D uint8 CPU tensor"):
            _ops.engine_add_block(engine, host.view(torch.int8), [p], offsets)
        with pytest.raises(ValueError, match="contiguous 1-D uint8 CPU tensor"):
            _ops.engine_add_block(engine, torch.cat([host, host])[::2], [p], offsets)
        with pytest.raises(ValueError, match="contiguous 1-D uint8 CPU tensor"):
            _ops.engine_add_block(engine, host.view(1, -1), [p], offsets)
        with pytest.raises(ValueError, match="does not fit"):
            _ops.engine_add_block(engine, host[:10], [p], offsets)
        with pytest.raises(ValueError, match="meta device"):
            _ops.engine_add_block(engine, host, [torch.nn.Parameter(torch.empty(4, 4, device="meta"))], offsets)
        assert _ops.engine_add_block(engine, host, [p], offsets) == 0
        assert p.numel() == 0  # a placeholder now
        with pytest.raises(ValueError, match="already offloaded"):
            _ops.engine_add_block(engine, host, [p], offsets)
        ops.engine_enter(engine, 0)
        with pytest.raises(RuntimeError, match="a block is running"):
            _ops.engine_trim(engine)
        with pytest.raises(RuntimeError, match="is running"):
            _ops.engine_destroy(engine)
        ops.engine_exit(engine, 0)
        ops.engine_exit(engine, 0)  # releasing twice is harmless: post-hooks also run after failed pre-hooks
        _ops.engine_trim(engine)
        assert _ops.engine_stats(engine)["device_bytes"] == 0
        with pytest.raises(RuntimeError, match="before the first forward"):
            ops.engine_enter(engine, 0)
            ops.engine_exit(engine, 0)
            _ops.engine_add_block(engine, host, [torch.nn.Parameter(torch.randn(2))], [0])
    finally:
        _ops.engine_destroy(engine)


def test_a_gathered_block_checks_its_sources_and_gathers_them():
    """Sources are each parameter's bytes elsewhere in host memory (a checkpoint's mapped pages):
    checked against the parameters, then gathered into the slot layout on every upload."""
    engine = _ops.engine_create(torch.device("cpu"), 0)
    values = [torch.randn(3, 5), torch.randn(7)]
    params = [torch.nn.Parameter(torch.empty_like(v)) for v in values]
    offsets, total = _ops.layout([p.detach() for p in params])
    try:
        with pytest.raises(ValueError, match="got 1 sources for 2 parameters"):
            _ops.engine_add_gathered_block(engine, values[:1], total, params, offsets)
        with pytest.raises(ValueError, match="source 0 must be a contiguous CPU tensor"):
            _ops.engine_add_gathered_block(engine, [values[0].t(), values[1]], total, params, offsets)
        with pytest.raises(ValueError, match="source 1 has 24 bytes, its parameter spans 28"):
            _ops.engine_add_gathered_block(engine, [values[0], values[1][:6]], total, params, offsets)
        with pytest.raises(ValueError, match="does not fit"):
            _ops.engine_add_gathered_block(engine, values, offsets[1], params, offsets)
        with pytest.raises(ValueError, match="parameter 0 must be contiguous and of its source's dtype"):
            _ops.engine_add_gathered_block(engine, [values[0].view(torch.int32), values[1]], total, params, offsets)
        transposed = [torch.nn.Parameter(torch.empty(5, 3).t()), params[1]]
        with pytest.raises(ValueError, match="parameter 0 must be contiguous"):
            _ops.engine_add_gathered_block(engine, values, total, transposed, offsets)
        assert _ops.engine_add_gathered_block(engine, values, total, params, offsets) == 0
        assert all(p.numel() == 0 for p in params) and _ops.engine_stats(engine)["staged_blocks"] == 1
        ops.engine_enter(engine, 0)
        assert all(torch.equal(p, v) for p, v in zip(params, values))
        ops.engine_exit(engine, 0)
        assert _ops.engine_stats(engine)["staged_bytes"] == total
    finally:
        _ops.engine_destroy(engine)


def test_pinning_memory_in_place_checks_its_arguments():
    memory = torch.zeros(4096, dtype=torch.uint8)
    with pytest.raises(ValueError, match="pinned host memory is for a CUDA device, got cpu"):
        _ops.pin_host(memory, torch.device("cpu"))
    with pytest.raises(ValueError, match="expected a contiguous CPU tensor"):
        _ops.pin_host(memory.view(64, 64).t(), torch.device("cuda"))
    _ops.pin_host(memory[:0], torch.device("cuda"))  # nothing to pin: the runtime would refuse an empty range
    _ops.unpin_host(memory[:0], torch.device("cuda"))
    if not torch.cuda.is_available():
        # No GPU here: no device, a CPU-only build, or a CUDA runtime without a driver; never a crash.
        with pytest.raises((ValueError, RuntimeError), match="no such device|CUDA build|cudaHostRegister of 4096"):
            _ops.pin_host(memory, torch.device("cuda"))


def test_pinned_memory_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(Exception, match="CUDA"):
        _ops.pack([torch.zeros(4)], [0], 16, True)


def test_pinned_memory_is_for_a_cuda_device():
    with pytest.raises(ValueError, match="pinned host memory is for a CUDA device, got cpu"):
        _ops.pack([torch.zeros(4)], [0], 16, True, torch.device("cpu"))


def test_pack_ignores_the_device_of_a_pageable_buffer():
    a = torch.arange(4.0)
    buffer = _ops.pack([a], [0], 16, False, torch.device("cpu"))
    assert torch.equal(buffer.view(torch.float32), a)


def test_opcheck_layout():
    tensors = [torch.randn(3, 5), torch.randn(4, dtype=torch.bfloat16)]
    torch.library.opcheck(ops.layout.default, (tensors, 256), test_utils=("test_schema", "test_faketensor"))


def test_opcheck_pack():
    tensors = [torch.randn(3, 5), torch.randn(7, 2).t(), torch.randn(4, dtype=torch.bfloat16)]
    offsets, total = _ops.layout(tensors)
    torch.library.opcheck(ops.pack.default, (tensors, offsets, total, False))
    torch.library.opcheck(ops.pack.default, (tensors, offsets, total, False, torch.device("cpu")))


@requires_cuda
def test_opcheck_pack_cuda():
    tensors = [torch.randn(3, 5, device="cuda"), torch.randn(4, dtype=torch.bfloat16, device="cuda")]
    offsets, total = _ops.layout(tensors)
    torch.library.opcheck(ops.pack.default, (tensors, offsets, total, True))
    torch.library.opcheck(ops.pack.default, (tensors, offsets, total, True, torch.device("cuda")))


def test_alloc_host_gives_an_exact_size_page_aligned_buffer():
    buffer = _ops.alloc_host(1000, False)
    assert buffer.dtype == torch.uint8 and buffer.shape == (1000,) and buffer.data_ptr() % 4096 == 0
    assert _ops.alloc_host(0, False).numel() == 0


def test_alloc_host_rejects_bad_arguments():
    with pytest.raises(ValueError, match="host buffer size must be >= 0, got -1"):
        _ops.alloc_host(-1, False)
    with pytest.raises(ValueError, match="pinned host memory is for a CUDA device, got cpu"):
        _ops.alloc_host(16, True, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="could not allocate"):
        _ops.alloc_host(2**62, False)


def test_opcheck_engine_staging_trace():
    engine = _ops.engine_create(torch.device("cpu"), 1)
    try:
        torch.library.opcheck(ops.engine_staging_trace.default, (engine,),
                              test_utils=("test_schema", "test_faketensor"))
    finally:
        _ops.engine_destroy(engine)


def test_opcheck_alloc_host():
    # Its bytes are left as they were, so only the schema and the fake implementation can be compared.
    torch.library.opcheck(ops.alloc_host.default, (1000, False), test_utils=("test_schema", "test_faketensor"))
