"""`patch_fastvideo()`: FastVideo's layerwise offload, loading and LoRA paths use this engine.

What is replaced, in FastVideo's own modules (all restored by `unpatch_fastvideo()`):
- `enable_layerwise_offload` (hooks/layerwise_offload.py, and the name component_loader.py
  imported): offloads every block list of the DiT, nested ones included, with this engine; the
  DiTs of one pipeline take turns on the device, so after Wan2.2's expert switch the idle expert
  holds no block on the GPU. Each DiT also gets the `_layerwise_offload_manager` that
  denoising.py looks for after the loop, which frees the slots before the VAE runs.
- `TransformerLoader.load`, the `maybe_load_fsdp_model` it calls and the
  `load_model_from_full_model_state_dict` that calls: when FastVideo will offload the DiT
  (inference, `dit_layerwise_offload`, no FSDP inference), the block weights are read from the
  checkpoint straight into the host store (fastvideo_checkpoint.py), or, where that path cannot
  follow FastVideo's, loaded into host memory first; the GPU never holds the whole DiT.
- With several ranks (FastVideo's world group: sequence-parallel workers), each DiT's host store
  is shared per node (`share=` the world group's gloo group). From the checkpoint, the node's
  leader alone reads the blocks into it, the ranks having agreed on the files; from loaded weights,
  the share compares them byte for byte. Where the ranks differ, every rank keeps its own store.
- `lora_pipeline._get_hook_ctx`: LoRA conversion, merge and unmerge of an offloaded block run
  inside `OffloadHandle.mutate(block)`, which writes the change back to the host store.
- `WorkerMultiprocProc.worker_main`: FastVideo's VideoGenerator loads and runs the DiT in
  spawned worker processes, which start without this patch; the spawned target becomes a
  function of this module, so each worker imports it, patches itself, then runs FastVideo's.
"""

from __future__ import annotations

import inspect
import logging
import threading

import torch

from .. import offloader, share
from .fastvideo_checkpoint import pending, wrap_state_dict_load

logger = logging.getLogger(__name__)

SUPPORTED = "0.2.1"
GROUP = "fastvideo-dit"

_originals: list[tuple[object, str, object]] = []
_loading = threading.local()


class _ReleaseManager:
    """What FastVideo's denoising stage calls after the loop: frees the DiT's device slots."""

    def __init__(self, handle: offloader.OffloadHandle):
        self._handle = handle

    @property
    def enabled(self) -> bool:
        return self._handle.enabled

    def release_all(self) -> None:
        self._handle.trim()


def _device() -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    from fastvideo.distributed.parallel_state import get_local_torch_device

    return get_local_torch_device()


def _ranks():
    """FastVideo's world group as a gloo ProcessGroup when it has several ranks, else None."""
    from fastvideo.distributed.parallel_state import get_world_group, model_parallel_is_initialized

    if model_parallel_is_initialized() and get_world_group().world_size > 1:
        return get_world_group().cpu_group
    return None


def _offload(model: torch.nn.Module, checkpoint=None) -> None:
    try:
        handle = offloader.enable(model, device=_device(), group=GROUP, checkpoint=checkpoint, share=_ranks())
    except share.Refused as exc:
        # Every rank was refused alike, so every rank retries alone.
        logger.warning("fastvideo_offload: each rank keeps its own host store of %s: %s", type(model).__name__, exc)
        handle = offloader.enable(model, device=_device(), group=GROUP, checkpoint=checkpoint)
    model._layerwise_offload_manager = _ReleaseManager(handle)


def enable_layerwise_offload(model: torch.nn.Module, is_replace: bool = False) -> None:
    """Replaces FastVideo's function of the same name and signature."""
    if offloader.handle_of(model) is None:  # else the loader enabled it from the checkpoint
        _offload(model)


def _wrap_hook_ctx(original):
    def get_hook_ctx(module):
        if module is not None:
            for handle in offloader.group_handles(GROUP):
                if handle.owns_block(module):
                    return handle.mutate(module)
        return original(module)

    return get_hook_ctx


def _wrap_transformer_load(original):
    def load(self, model_path, fastvideo_args, *args, **kwargs):
        to_host = bool(
            getattr(fastvideo_args, "inference_mode", False)
            and getattr(fastvideo_args, "dit_layerwise_offload", False)
            and not getattr(fastvideo_args, "use_fsdp_inference", False)
            and not getattr(fastvideo_args, "training_mode", False)
        )
        previous = getattr(_loading, "to_host", False)
        _loading.to_host = to_host
        try:
            return original(self, model_path, fastvideo_args, *args, **kwargs)
        finally:
            _loading.to_host = previous

    return load


def _wrap_fsdp_load(original):
    def maybe_load_fsdp_model(*args, **kwargs):
        if not getattr(_loading, "to_host", False):
            return original(*args, **kwargs)
        # The DiT is about to be offloaded block by block: its state-dict load (wrapped) reads the
        # checkpoint into the host store, or into host memory, instead of onto the GPU.
        pending.files = kwargs["weight_dir_list"]
        try:
            return original(*args, **kwargs)
        finally:
            pending.files = None

    return maybe_load_fsdp_model


def _worker_main(*args, **kwargs):
    """Runs in a freshly spawned FastVideo worker: patch, then FastVideo's own worker_main."""
    patch_fastvideo()
    from fastvideo.worker.multiproc_executor import WorkerMultiprocProc

    return _original(WorkerMultiprocProc, "worker_main")(*args, **kwargs)


def _original(owner, name):
    for patched_owner, patched_name, original in _originals:
        if patched_owner is owner and patched_name == name:
            return original.__func__ if isinstance(original, staticmethod) else original
    return getattr(owner, name)


def _targets():
    try:
        import fastvideo
        from fastvideo.hooks import layerwise_offload
        from fastvideo.models.loader import component_loader, fsdp_load
        from fastvideo.pipelines import lora_pipeline
        from fastvideo.worker import multiproc_executor
    except ImportError as exc:
        raise ImportError(f"patch_fastvideo needs FastVideo {SUPPORTED} installed: {exc}") from exc
    version = getattr(fastvideo, "__version__", "unknown")
    loader = component_loader.__name__
    wanted = [
        (layerwise_offload, layerwise_offload.__name__, "enable_layerwise_offload", lambda _: enable_layerwise_offload),
        (component_loader, loader, "enable_layerwise_offload", lambda _: enable_layerwise_offload),
        (component_loader, loader, "maybe_load_fsdp_model", _wrap_fsdp_load),
        (fsdp_load, fsdp_load.__name__, "load_model_from_full_model_state_dict",
         lambda original: wrap_state_dict_load(original, _offload)),
        (getattr(component_loader, "TransformerLoader", None), f"{loader}.TransformerLoader", "load",
         _wrap_transformer_load),
        (lora_pipeline, lora_pipeline.__name__, "_get_hook_ctx", _wrap_hook_ctx),
        (getattr(multiproc_executor, "WorkerMultiprocProc", None), f"{multiproc_executor.__name__}.WorkerMultiprocProc",
         "worker_main", lambda _: staticmethod(_worker_main)),
    ]
    for owner, where, name, _ in wanted:
        if owner is None or not hasattr(owner, name):
            raise RuntimeError(
                f"patch_fastvideo: FastVideo {version} has no {where}.{name}, which the patch replaces "
                f"(written against FastVideo {SUPPORTED})"
            )
    return [(owner, name, make) for owner, _, name, make in wanted]


def patch_fastvideo() -> None:
    """From now on FastVideo's layerwise offload uses this engine. Idempotent; works before or
    after `import fastvideo`."""
    if _originals:
        return
    for owner, name, make in _targets():
        # Static lookup keeps a class's staticmethod a staticmethod when it is put back.
        original = inspect.getattr_static(owner, name)
        _originals.append((owner, name, original))
        setattr(owner, name, make(original))


def unpatch_fastvideo() -> None:
    """Puts FastVideo's own functions back. Models already offloaded stay offloaded."""
    while _originals:
        owner, name, original = _originals.pop()
        setattr(owner, name, original)


def is_patched() -> bool:
    return bool(_originals)
