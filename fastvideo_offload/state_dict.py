"""state_dict and load_state_dict of an offloaded model go through the host store: a
checkpoint saved under offload holds the real weights, and one loaded under offload
reaches the next forward."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils.hooks import RemovableHandle

from . import formats


def attach_state_dict_hooks(
    model: nn.Module, host_views: dict[str, torch.Tensor], on_load: Callable[[], None]
) -> list[RemovableHandle]:
    """`host_views` maps each qualified parameter name to its value in the host store, in the
    parameter's own format (formats.rebuild: a torchao or GGUF tensor around host views)."""
    by_owner: dict[str, dict[str, torch.Tensor]] = {}
    for name, view in host_views.items():
        owner, _, local = name.rpartition(".")
        by_owner.setdefault(owner, {})[local] = view
    loaded: set[str] = set()

    def make_hooks(entries: dict[str, torch.Tensor]):
        lent: list[tuple[torch.Tensor, torch.Tensor]] = []

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
                problem = formats.copy_into(view, value)
                if problem:
                    error_msgs.append(f"format mismatch for {key}: {problem}")
                    continue
                loaded.add(key)

        def load_post(module, incompatible_keys):
            if not loaded:
                return
            # The loader saw the popped keys as missing: they were loaded, into the host store.
            incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if k not in loaded]
            loaded.clear()
            on_load()

        return save_pre, save, load_pre, load_post

    handles = []
    for owner, entries in by_owner.items():
        module = model.get_submodule(owner)
        save_pre, save, load_pre, load_post = make_hooks(entries)
        handles.append(module.register_state_dict_pre_hook(save_pre))
        handles.append(module.register_state_dict_post_hook(save))
        handles.append(module.register_load_state_dict_pre_hook(load_pre))
        handles.append(module.register_load_state_dict_post_hook(load_post))
    return handles
