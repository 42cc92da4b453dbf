"""Random argument combinations against every op: each call either does exactly what it
says or raises a Python exception that names the problem; the process never crashes."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastvideo_offload  # noqa: F401
from fastvideo_offload import _ops

ops = torch.ops.fastvideo_offload
EXPECTED = (ValueError, IndexError, RuntimeError, TypeError)
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.uint8, torch.int64, torch.float64]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
    t = torch.arange(int(torch.tensor(shape).prod()) if shape else 1).to(dtype).reshape(shape)
    kind = draw(st.sampled_from(["plain", "transposed", "strided"]))
    if kind == "transposed" and t.dim() >= 2:
        t = t.transpose(0, 1)
    elif kind == "strided" and t.dim() >= 1:
        t = torch.cat([t, t], dim=-1)[..., ::2]
    return t


def bytes_of(t: torch.Tensor) -> bytes:
    flat = torch.empty(t.numel(), dtype=t.dtype).copy_(t.reshape(-1))
    return flat.view(torch.uint8).numpy().tobytes()


@SETTINGS
@given(st.lists(tensors(), max_size=6), st.integers(-1024, 8192))
def test_layout(ts, alignment):
    try:
        offsets, total = _ops.layout(ts, alignment)
    except ValueError as exc:
        assert "alignment" in str(exc)
        assert alignment < 256 or alignment & (alignment - 1)
        return
    end = 0
    for off, t in zip(offsets, ts):
        assert off % alignment == 0 and off >= end
        end = off + _span(t)
    assert total == end


def _span(t):
    if t.numel() == 0:
        return 0
    return (1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))) * t.element_size()


@SETTINGS
@given(st.lists(tensors(), min_size=1, max_size=5), st.data())
def test_pack(ts, data):
    offsets, total = _ops.layout(ts)
    if data.draw(st.booleans()):  # break the layout at random
        offsets = data.draw(st.lists(st.integers(-512, total + 512), min_size=0, max_size=len(ts) + 1))
        total = data.draw(st.integers(-8, total + 512))
    try:
        buffer = _ops.pack(ts, offsets, total, False)
    except EXPECTED as exc:
        assert str(exc)
        return
    assert buffer.numel() == total
    for off, t in zip(offsets, ts):
        back = torch.empty(0, dtype=t.dtype).set_(buffer.untyped_storage(), off // t.element_size(), t.shape,
                                                  t.stride())
        assert bytes_of(back) == bytes_of(t)


@SETTINGS
@given(st.one_of(st.integers(-(2**63), 1 << 20), st.integers(2**62, 2**63 - 1)), st.booleans(),
       st.sampled_from([None, torch.device("cpu"), torch.device("cuda", 7)]))
def test_alloc_host(nbytes, pinned, device):
    try:
        buffer = _ops.alloc_host(nbytes, pinned, device)
    except EXPECTED as exc:
        assert str(exc)
        return
    assert buffer.numel() == nbytes and buffer.dtype == torch.uint8 and not buffer.is_cuda


@SETTINGS
@given(st.lists(tensors(), min_size=1, max_size=4), st.data())
def test_engine_add_block_enter_exit(ts, data):
    params = [torch.nn.Parameter(t, requires_grad=False) for t in ts]
    expected = [t.clone() for t in ts]
    offsets, total = _ops.layout([p.detach() for p in params])
    host = _ops.pack([p.detach() for p in params], offsets, total, False)  # add_block's contract
    if data.draw(st.booleans()):
        offsets = data.draw(st.lists(st.integers(-512, total + 512), max_size=len(ts) + 1))
    engine = _ops.engine_create(torch.device("cpu"), data.draw(st.integers(0, 3)))
    try:
        try:
            block = _ops.engine_add_block(engine, host, params, offsets)
        except EXPECTED as exc:
            assert str(exc)
            assert all(torch.equal(p, e) for p, e in zip(params, expected))  # untouched
            return
        for _ in range(data.draw(st.integers(1, 3))):
            ops.engine_enter(engine, block)
            assert all(torch.equal(p, e) and p.stride() == t.stride() for p, e, t in zip(params, expected, ts))
            ops.engine_exit(engine, block)
        for call in data.draw(st.lists(st.sampled_from(["enter", "exit", "park", "trim", "reset"]), max_size=6)):
            index = data.draw(st.integers(-2, 2))
            try:
                {
                    "enter": lambda: ops.engine_enter(engine, index),
                    "exit": lambda: ops.engine_exit(engine, index),
                    "park": lambda: _ops.engine_park(engine, index),
                    "trim": lambda: _ops.engine_trim(engine),
                    "reset": lambda: _ops.engine_reset(engine),
                }[call]()
            except EXPECTED as exc:
                assert str(exc)
    finally:
        _ops.engine_reset(engine)
        _ops.engine_destroy(engine)


@SETTINGS
@given(st.one_of(st.integers(max_value=0), st.integers(min_value=2**40, max_value=2**63 - 1)),
       st.integers(-(2**63), 2**63 - 1))
def test_unknown_engines_and_blocks(handle, block):
    for call in (
        lambda: ops.engine_enter(handle, block),
        lambda: ops.engine_exit(handle, block),
        lambda: _ops.engine_park(handle, block),
        lambda: _ops.engine_set_slot_budget(handle, block),
        lambda: _ops.engine_stats(handle),
        lambda: _ops.engine_trace_staging(handle, True),
        lambda: _ops.engine_staging_trace(handle),
    ):
        with pytest.raises(EXPECTED):
            call()
