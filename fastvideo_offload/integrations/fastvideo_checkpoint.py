"""FastVideo's DiT loader reading the checkpoint straight into the host store.

FastVideo's `maybe_load_fsdp_model` builds the DiT on the meta device, then calls
`load_model_from_full_model_state_dict`, which reads every tensor of the checkpoint into host
memory, renames and casts it, and assigns it. Under `patch_fastvideo()`, when the DiT is to be
offloaded, that one call is replaced: `enable(..., checkpoint=CheckpointWeights(files, rename=
FastVideo's mapping))` reads the block tensors into the host store and the rest onto the device.
The rest of FastVideo's loader (building on meta in its default dtype, non-persistent buffers,
requires_grad, quantization, regional compile) runs as before.

What this path cannot do exactly as FastVideo does falls back to FastVideo's own load into host
memory (the patched loader offloads it from there), with the reason logged: a whole-parameter LoRA
adapter, quantized linears, and a checkpoint the model does not fit exactly (merged or extra keys,
zero-initialised parameters). A DiT without a list of blocks loads as FastVideo loads it. With
several ranks on a node, the node's leader alone reads the blocks, into the store the ranks share
(fastvideo.py).
"""

from __future__ import annotations

import logging
import threading

import torch

from ..blocks import find_block_lists
from ..checkpoint import CheckpointError, CheckpointWeights

logger = logging.getLogger(__name__)

#: What the wrapped maybe_load_fsdp_model hands the wrapped state-dict load: the checkpoint files,
#: set only while a DiT that will be offloaded loads.
pending = threading.local()


def wrap_state_dict_load(original, offload):
    """FastVideo's state-dict load, which reads the checkpoint into the host store while a DiT the
    patch offloads loads; `offload(model, checkpoint=...)` enables it as enable_layerwise_offload does."""

    def load_model_from_full_model_state_dict(model, full_sd_iterator, device, param_dtype, strict=False,
                                              cpu_offload=False, param_names_mapping=None, training_mode=True,
                                              dense_lora_patch=None):
        files = getattr(pending, "files", None)
        if files and _has_blocks(model):  # else FastVideo loads it onto its device and it stays there
            reason = _why_not(model, dense_lora_patch)
            if reason is None:
                try:
                    return _load(model, files, device, param_dtype, param_names_mapping, offload)
                except CheckpointError as exc:
                    reason = str(exc)
            logger.info("fastvideo_offload: FastVideo loads the DiT into host memory first, because %s", reason)
            device = torch.device("cpu")  # the patched TransformerLoader.load offloads it from there
        return original(model, full_sd_iterator, device, param_dtype, strict=strict, cpu_offload=cpu_offload,
                        param_names_mapping=param_names_mapping, training_mode=training_mode,
                        dense_lora_patch=dense_lora_patch)

    return load_model_from_full_model_state_dict


def _has_blocks(model) -> bool:
    try:
        find_block_lists(model)
    except ValueError:
        return False
    return True


def _why_not(model, dense_lora_patch) -> str | None:
    from fastvideo.layers.linear import UnquantizedLinearMethod

    if dense_lora_patch is not None:
        return "a whole-parameter LoRA adapter (lora_path) is folded into the weights as they load"
    quantized = [n for n, m in model.named_modules()
                 if getattr(m, "quant_method", None) is not None
                 and not isinstance(m.quant_method, UnquantizedLinearMethod)]
    if quantized:
        return f"{quantized[0]} and {len(quantized) - 1} other module(s) are quantized after loading"
    return None


def _load(model, files, device, param_dtype, param_names_mapping, offload):
    from torch.nn.modules.module import _IncompatibleKeys

    def rename(key: str) -> str:
        return param_names_mapping(key)[0] if param_names_mapping is not None else key

    checkpoint = CheckpointWeights(files, rename=rename)  # refuses merges before anything changes
    _cast_on_meta(model, param_dtype)
    if hasattr(model, "materialize_non_persistent_buffers"):
        # They are saved nowhere: enable needs them real to move them to the device.
        model.materialize_non_persistent_buffers(device=device, dtype=param_dtype)
    offload(model, checkpoint=checkpoint)
    model.reverse_param_names_mapping = {name: (e.key, None, None) for name, e in checkpoint.entries.items()}
    return _IncompatibleKeys([], [])


def _cast_on_meta(model, param_dtype) -> None:
    """The dtype FastVideo gives each loaded tensor (its model's per-parameter choice, else the
    DiT's precision), set on the meta tensors: enable casts the checkpoint's bytes to it."""
    select = getattr(model, "_get_parameter_dtype", None)
    for name, t in model.state_dict(keep_vars=True).items():
        dtype = select(name, param_dtype) if callable(select) else param_dtype
        if t.dtype == dtype:
            continue
        if isinstance(t, torch.nn.Parameter):
            t.data = t.data.to(dtype)
        else:
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = t.to(dtype)
