"""state_dict and load_state_dict of an offloaded model go through the host store: a
checkpoint saved under offload holds the real weights, and one loaded under offload
reaches the next forward."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def attach_state_dict_hooks(
    model: nn.Module, host_views: dict[str, torch.Tensor], on_load: Callable[[], None]
) -> list[RemovableHandle]:
    """`host_views` maps each qualified parameter name to its bytes in the host store."""
    by_owner: dict[str, dict[str, torch.Tensor]] = {}
    for name, view in host_views.items():
        owner, _, local = name.rpartition(".")
        by_owner.setdefault(owner, {})[local] = view
    loaded: set[str] = set()

    def make_hooks(entries: dict[str, torch.Tensor]):
        def save(module, state_dict, prefix, local_metadata):
            for local, view in entries.items():
                if prefix + local in state_dict:
                    state_dict[prefix + local] = view

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
                with torch.no_grad():
                    view.copy_(value)
                loaded.add(key)

        def load_post(module, incompatible_keys):
            if not loaded:
                return
            # The loader saw the popped keys as missing: they were loaded, into the host store.
            incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if k not in loaded]
            loaded.clear()
            on_load()

        return save, load_pre, load_post

    handles = []
    for owner, entries in by_owner.items():
        module = model.get_submodule(owner)
        save, load_pre, load_post = make_hooks(entries)
        handles.append(module.register_state_dict_post_hook(save))
        handles.append(module.register_load_state_dict_pre_hook(load_pre))
        handles.append(module.register_load_state_dict_post_hook(load_post))
    return handles
