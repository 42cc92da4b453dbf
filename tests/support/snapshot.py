"""What a model holds, to check that a call that failed left it exactly as it was."""

import torch

import fastvideo_offload as fo


def hook_count(model):
    return sum(
        len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._state_dict_hooks)
        + len(m._load_state_dict_pre_hooks) + len(m._load_state_dict_post_hooks)
        for m in model.modules()
    )


def snapshot(model):
    params = {n: (p, p.data_ptr(), p.device, p.dtype, p.stride(), p.requires_grad, p.detach().clone())
              for n, p in model.named_parameters()}
    return params, dict(model.named_buffers()), hook_count(model)


def assert_unchanged(model, before, moved=()):
    """Every parameter and buffer as `before` saw it, no handle, no hook added. The parameters
    under the prefixes in `moved` (packed host weights, copied back out of their store) may sit at
    another address."""
    params, buffers, hooks = before
    assert fo.handle_of(model) is None and hook_count(model) == hooks
    for name, p in model.named_parameters():
        obj, ptr, device, dtype, stride, grad, values = params[name]
        assert p is obj and p.device == device and p.dtype == dtype and p.stride() == stride, name
        assert p.requires_grad == grad and torch.equal(p.detach(), values), name
        if not any(name.startswith(prefix) for prefix in moved):
            assert p.data_ptr() == ptr, name
    assert dict(model.named_buffers()).keys() == buffers.keys()
    assert all(model.get_buffer(n) is b for n, b in buffers.items())
