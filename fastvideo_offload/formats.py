"""A parameter -> the plain tensors that hold its bytes, and back.

The host store packs plain tensors only and the engine swaps their `.data`. A plain parameter, or a
subclass with storage of its own (diffusers' GGUFParameter), is its own holder. A wrapper subclass
(torchao's quantized tensors, anything with `__tensor_flatten__`) has no storage: its bytes live in
the inner tensors it holds, so those are offloaded instead, and the wrapper the module keeps reads
whatever data they hold. bitsandbytes layers are refused (`check`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass


def check(named: Iterable[tuple[str, torch.Tensor]], device: torch.device) -> None:
    """Refuses, before anything changes, a parameter whose bytes offload cannot own."""
    for name, p in named:
        if type(p).__module__.split(".")[0] == "bitsandbytes":
            owner = name.rpartition(".")[0] or "the model"
            raise ValueError(
                f"enable: {owner} is a bitsandbytes layer ({name} is a {type(p).__name__}), which cannot be "
                "offloaded: 8-bit layers keep a second copy of the weight (state.CB) that their forward reads, so "
                "offload would free nothing, and 4-bit layers repack their weight inside the first forward. Use "
                "the unquantized model, or torchao or GGUF quantization; the model was left as it was"
            )
        if is_traceable_wrapper_subclass(p) and p.device != device:
            # The wrapper's device is fixed when it is built; its inner tensors moving alone would
            # leave it reporting the old one.
            raise ValueError(
                f"enable: {name} is a {type(p).__name__} on {p.device}, and offloading to {device} would leave the "
                f"tensor subclass reporting {p.device}; quantize the model on {device}, or offload to {p.device}; "
                "the model was left as it was"
            )
        _refuse_hidden_tensors(name, p)


def _refuse_hidden_tensors(name: str, p: torch.Tensor) -> None:
    """A wrapper's bytes must all be in the inner tensors it flattens to: a cached copy (a
    dequantized or transposed weight) would stay where it is, and be read."""
    if not is_traceable_wrapper_subclass(p):
        return
    attrs, _ = p.__tensor_flatten__()
    held = {id(getattr(p, a)) for a in attrs}
    for attr, value in vars(p).items():
        if isinstance(value, torch.Tensor) and id(value) not in held:
            raise ValueError(
                f"enable: {name} is a {type(p).__name__} holding a tensor ({attr}) outside the inner tensors its "
                "__tensor_flatten__ names; offload could not free or restore it, so it refuses this tensor subclass"
            )
    for a in attrs:
        _refuse_hidden_tensors(f"{name}.{a}", getattr(p, a))


def holders(name: str, p: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The tensors whose `.data` offload swaps for `p`, each with its qualified name: `p` itself,
    or a wrapper's inner tensors, recursively flattened."""
    if not is_traceable_wrapper_subclass(p):
        return [(name, p)]
    return [h for a in p.__tensor_flatten__()[0] for h in holders(f"{name}.{a}", getattr(p, a))]


def nbytes(p: torch.Tensor) -> int:
    """The bytes that hold `p` (a wrapper's `element_size` is its logical dtype's, not its storage's)."""
    return sum(h.numel() * h.element_size() for _, h in holders("", p))


def plain(t: torch.Tensor) -> torch.Tensor:
    """`t`'s data as a plain tensor: a subclass's `__torch_function__` (GGUF's) must not see the ops."""
    with torch._C.DisableTorchFunctionSubclass():
        return t.detach()


def rebuild(p: torch.Tensor, views: list[torch.Tensor]) -> torch.Tensor:
    """`p`'s format around `views` (its holders' bytes in the host store, in `holders` order)."""
    return _rebuild(p, iter(views))


def _rebuild(p: torch.Tensor, views) -> torch.Tensor:
    if is_traceable_wrapper_subclass(p):
        attrs, ctx = p.__tensor_flatten__()
        inner = {a: _rebuild(getattr(p, a), views) for a in attrs}
        return type(p).__tensor_unflatten__(inner, ctx, p.size(), p.stride())
    view = next(views)
    if type(p) in (torch.Tensor, torch.nn.Parameter):
        return view
    # A subclass with storage of its own: the same type over the host bytes, with its attributes
    # (GGUF's quant_type) kept.
    out = torch.Tensor._make_subclass(type(p), view, False)
    out.__dict__.update(_attributes(p))
    return out


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> str | None:
    """Writes `src` into `dst` (a `rebuild` over host views), or, writing nothing, says why its
    format differs."""
    problem = mismatch(dst, src)
    if problem is None:
        _copy(dst, src)
    return problem


def mismatch(dst: torch.Tensor, src: torch.Tensor) -> str | None:
    """Why `src`'s format differs from `dst`'s (what `copy_into` checks), or None."""
    if is_traceable_wrapper_subclass(dst):
        if type(src) is not type(dst):
            return f"expected a {type(dst).__name__}, got a {type(src).__name__}"
        attrs, ctx = dst.__tensor_flatten__()
        src_attrs, src_ctx = src.__tensor_flatten__()
        if src_attrs != attrs or src_ctx != ctx:
            return f"its {type(dst).__name__} layout {src_attrs} {src_ctx} differs from the model's {attrs} {ctx}"
        for a in attrs:
            inner, value = getattr(dst, a), getattr(src, a)
            if value.shape != inner.shape or value.dtype != inner.dtype:
                return (f"inner tensor {a} is {value.dtype} {tuple(value.shape)}, "
                        f"the model's {inner.dtype} {tuple(inner.shape)}")
            problem = mismatch(inner, value)
            if problem:
                return f"inner tensor {a}: {problem}"
    elif type(src) is type(dst) and type(dst) not in (torch.Tensor, torch.nn.Parameter):
        mine, theirs = _attributes(dst), _attributes(src)
        if mine != theirs:
            return f"its {type(dst).__name__} attributes {theirs} differ from the model's {mine}"
    return None


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    if is_traceable_wrapper_subclass(dst):
        for a in dst.__tensor_flatten__()[0]:
            _copy(getattr(dst, a), getattr(src, a))
        return
    with torch.no_grad():
        plain(dst).copy_(plain(src))


def _attributes(t: torch.Tensor) -> dict:
    """A storage-backed subclass's own attributes (GGUF's quant_type), less the Parameter marker."""
    return {k: v for k, v in vars(t).items() if k != "_is_param"}
