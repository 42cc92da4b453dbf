"""state_dict and load_state_dict of an offloaded model go through the host store: a
checkpoint saved under offload holds the real weights, and one loaded under offload
reaches the next forward."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils.hooks import RemovableHandle

from . import formats
from .share import checksum as shared_checksum

if TYPE_CHECKING:
    from .share import NodeShare


def attach_state_dict_hooks(
    model: nn.Module, host_views: dict[str, torch.Tensor], on_load: Callable[[], None], shared: NodeShare | None = None
) -> list[RemovableHandle]:
    """`host_views` maps each qualified parameter name to its value in the host store, in the
    parameter's own format (formats.rebuild: a torchao or GGUF tensor around host views).

    A load writes each module's keys once the module has loaded (its post-hook). In a node's
    shared store (`shared`) that is a change of the share (NodeShare.change): every rank loads the
    same values, and the node's leader writes them; so each module that holds offloaded weights
    takes part on every rank, whether its keys are in the state dict or not. state_dict() then
    hands out the shared pages as `SharedWeight`s, which refuse in-place writes."""
    by_owner: dict[str, dict[str, torch.Tensor]] = {}
    for name, view in host_views.items():
        owner, _, local = name.rpartition(".")
        by_owner.setdefault(owner, {})[local] = view

    def make_hooks(owner: str, entries: dict[str, torch.Tensor]):
        lent: list[tuple[torch.Tensor, torch.Tensor]] = []
        pending: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (key, host view, value) checked, to write

        def save_pre(module, prefix, keep_vars):
            # torch's own save detaches each parameter first, and a wrapper subclass rebuilds itself
            # from its inner tensors there: empty placeholders, which some refuse (torchao's Intx
            # asserts on their rank). They hold their host views until `save`.
            for local, host in entries.items():
                param = module._parameters[local]
                if param is not None and is_traceable_wrapper_subclass(param):
                    for (_, h), (_, view) in zip(formats.holders("", param), formats.holders("", host)):
                        lent.append((h, h.data))
                        h.data = view

        def save(module, state_dict, prefix, local_metadata):
            while lent:
                h, data = lent.pop()
                h.data = data
            for local, view in entries.items():
                if prefix + local in state_dict:
                    state_dict[prefix + local] = view if shared is None else shared.shown(view)

        def load_pre(module, state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs):
            for local, view in entries.items():
                key = prefix + local
                if key not in state_dict:
                    continue
                value = state_dict.pop(key)
                if value.shape != view.shape:
                    error_msgs.append(
                        f"size mismatch for {key}: copying a param with shape {value.shape} from checkpoint, "
                        f"the shape in current model is {view.shape}."
                    )
                    continue
                problem = formats.mismatch(view, value)
                if problem:
                    error_msgs.append(f"format mismatch for {key}: {problem}")
                    continue
                pending.append((key, view, value))

        def write():
            for _, view, value in pending:
                formats.copy_into(view, value)

        def load_post(module, incompatible_keys):
            loaded = {key for key, _, _ in pending}
            try:
                if shared is not None:
                    digest = [(key, [shared_checksum(formats.plain(h)) for _, h in formats.holders(key, value)])
                              for key, _, value in pending]
                    shared.change(f"load_state_dict of {owner or 'the model'}", digest, write)
                elif pending:
                    write()
            finally:
                pending.clear()
            if not loaded:
                return
            # The loader saw the popped keys as missing: they were loaded, into the host store.
            incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if k not in loaded]
            on_load()

        return save_pre, save, load_pre, load_post

    handles = []
    for owner, entries in by_owner.items():
        module = model.get_submodule(owner)
        save_pre, save, load_pre, load_post = make_hooks(owner, entries)
        handles.append(module.register_state_dict_pre_hook(save_pre))
        handles.append(module.register_state_dict_post_hook(save))
        handles.append(module.register_load_state_dict_pre_hook(load_pre))
        handles.append(module.register_load_state_dict_post_hook(load_post))
    return handles
