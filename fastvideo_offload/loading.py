"""from_pretrained: a model saved in a folder, built without its weights and offloaded straight from
its checkpoint files, in one call (what diffusers users write as `Class.from_pretrained(folder)`)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .api import enable


def from_pretrained(
    model_class: type[nn.Module],
    folder: str | os.PathLike,
    *,
    torch_dtype: torch.dtype | None = None,
    config: dict[str, Any] | None = None,
    **enable_kwargs,
) -> nn.Module:
    """The `model_class` model saved in `folder`, offloaded from its safetensors files: it is never
    whole in host memory. Returns the model; `handle_of(model)` is its OffloadHandle.

    Args:
        model_class: a diffusers model class (built from the folder's config.json with
            `from_config`), or any nn.Module class built as `model_class(**config)`.
        folder: the folder `save_pretrained` wrote: its weights (one file or a sharded index) and,
            for a diffusers class, its config.json.
        torch_dtype: the dtype of the floating-point parameters, as diffusers' `from_pretrained(...,
            torch_dtype=)` gives them: the class's `_keep_in_fp32_modules` stay float32. None: the
            dtypes the class builds.
        config: the constructor's arguments, for a class without `from_config`.
        **enable_kwargs: passed to `enable` (device, prefetch, group, host_pin_budget, ...).
    """
    if "checkpoint" in enable_kwargs:
        raise TypeError("from_pretrained: the checkpoint is `folder`; pass no checkpoint=")
    if torch_dtype is not None and not (isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point):
        raise TypeError(f"from_pretrained: torch_dtype must be a floating-point torch.dtype, got {torch_dtype!r}")
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"from_pretrained: {folder} is not a folder")
    model = _build_empty(model_class, folder, config)
    if torch_dtype is not None:
        keep = getattr(model, "_keep_in_fp32_modules", None) or []
        for name, p in model.named_parameters():
            if p.is_floating_point() and not any(k in name.split(".") for k in keep):
                p.data = p.data.to(torch_dtype)
    enable(model.eval(), checkpoint=folder, **enable_kwargs)
    return model


def _build_empty(model_class, folder: str, config: dict[str, Any] | None) -> nn.Module:
    """The model on the meta device, its buffers real (checkpoints do not hold non-persistent ones)."""
    try:
        from accelerate import init_empty_weights
    except ImportError as exc:
        raise ImportError("from_pretrained needs accelerate to build the model without its weights "
                          "(pip install accelerate)") from exc
    from_config = getattr(model_class, "from_config", None)
    load_config = getattr(model_class, "load_config", None)
    with init_empty_weights():
        if config is not None:
            return model_class(**config)
        if from_config is None or load_config is None:
            raise TypeError(f"from_pretrained: {model_class.__name__} has no from_config/load_config (not a "
                            "diffusers model class): pass config={...}, its constructor's arguments")
        return from_config(load_config(folder))
