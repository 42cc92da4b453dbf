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
  follow FastVideo's, loaded into host memory first and offloaded once loaded, whether or not
  FastVideo's loader would have called its offload (it does so only for a top-level ModuleList:
  not for LTX-2). A DiT that cannot be offloaded goes whole to the device, as FastVideo leaves it;
  the GPU never holds the whole DiT of one that can, and no DiT stays in host memory.
- FastVideo's hook API on each offloaded block: `ModuleHookManager.get_from(block)
  .get_forward_hook("LayerwiseOffloadHook")` is a hook whose `state.cpu_named_parameters` are the
  block's weights in the host store and whose `mutate_params_scope()` is `handle.mutate(block)`.
  Removing it (`remove_forward_hook`, `replace_forward_hook`) is refused: the engine streams a
  model's blocks as one and cannot let one of them go; `handle.disable()` puts them all back.
- With several ranks (FastVideo's world group: sequence-parallel workers), each DiT's host store
  is shared per node (`share=` the world group's gloo group). From the checkpoint, the node's
  leader alone reads the blocks into it, the ranks having agreed on the files; from loaded weights,
  the share compares them byte for byte. Where the ranks differ, every rank keeps its own store.
- `lora_pipeline._get_hook_ctx` and `LoRAPipeline.convert_to_lora_layers`: FastVideo files LoRA
  layers under the blocks of the DiT's first top-level ModuleList; under the patch they are filed
  under the blocks the patch offloaded (every list, nested ones included), and the conversion,
  merge and unmerge of each run inside `OffloadHandle.mutate(block)`, which writes the change back
  to the host store.
- `WorkerMultiprocProc.worker_main`: FastVideo's VideoGenerator loads and runs the DiT in
  spawned worker processes, which start without this patch; the spawned target becomes a
  function of this module, so each worker imports it, patches itself, then runs FastVideo's.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import weakref

import torch

from .. import api, offloader, registry, share
from ..blocks import find_block_lists
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
    # FastVideo offloads only DiTs it loads for inference, which its loader puts in eval mode next;
    # in eval mode enable() streams every block weight, the trainable-looking norms and biases of
    # FastVideo's layers too (in training mode they would stay resident, as LoRA's do).
    model.eval()
    try:
        handle = api.enable(model, device=_device(), group=GROUP, checkpoint=checkpoint, share=_ranks())
    except share.Refused as exc:
        # Every rank was refused alike, so every rank retries alone.
        logger.warning("fastvideo_offload: each rank keeps its own host store of %s: %s", type(model).__name__, exc)
        handle = api.enable(model, device=_device(), group=GROUP, checkpoint=checkpoint)
    model._layerwise_offload_manager = _ReleaseManager(handle)
    _register_hooks(model, handle)


def enable_layerwise_offload(model: torch.nn.Module, is_replace: bool = False) -> None:
    """Replaces FastVideo's function of the same name and signature."""
    if api.handle_of(model) is not None or getattr(_loading, "to_host", False):
        return  # the loader enabled it from the checkpoint, or places it once loaded (_place)
    try:
        find_block_lists(model)
    except ValueError as exc:
        # FastVideo's words first, for code that matches them; its call can name no list of blocks.
        raise ValueError(
            "No nn.ModuleList found in the model for layerwise offloading: fastvideo_offload finds no list of "
            f"transformer blocks in {type(model).__name__} at any depth, and FastVideo's call cannot name one; "
            "offload it with fastvideo_offload.enable(model, blocks=['path.to.list'])"
        ) from exc
    _offload(model)


def _place(model: torch.nn.Module) -> None:
    """A DiT FastVideo's loader has loaded to be offloaded: offloaded, or, where it cannot be, on the
    device, where FastVideo leaves a DiT it does not offload; never left in host memory."""
    if api.handle_of(model) is not None:
        return
    try:
        _offload(model)
    except (ValueError, TypeError) as exc:  # enable's refusals; they leave the model as it was
        device = _device()
        logger.warning("fastvideo_offload: %s is not offloaded and goes whole to %s: %s", type(model).__name__,
                       device, exc)
        model.to(device)


def _enclosing_block(name: str, blocks) -> str | None:
    """The path in `blocks` that `name` lies inside (the longest, should blocks nest), or None."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in blocks:
            return prefix
    return None


@functools.cache
def _offloaded_lora_layers():
    from fastvideo.pipelines.lora_pipeline import LoRAModelLayers

    class OffloadedLoRALayers(LoRAModelLayers):
        """FastVideo's LoRA bookkeeping of one DiT over the blocks the patch offloaded. FastVideo
        files a layer under the block its first two name components name, which for a nested list
        (LTX-2's model.transformer_blocks.N) is no block at all: each layer goes here under the
        offloaded block that holds it."""

        def add_lora_layer(self, block_name, layer_name, layer):
            super().add_lora_layer(_enclosing_block(layer_name, self.block_mapping), layer_name, layer)

    return OffloadedLoRALayers


def _wrap_lora_conversion(original):
    def convert_to_lora_layers(self):
        # FastVideo maps layers to the blocks of the first top-level ModuleList only; layers of any
        # other offloaded block would get no mutate scope and be converted and merged into its
        # placeholders. Seeded here, FastVideo's conversion uses these blocks instead.
        if not self.lora_initialized:
            for name, dit in self.trainable_transformer_modules.items():
                handle = api.handle_of(dit)
                if handle is not None and name not in self.lora_layers:
                    blocks = [(path, m) for path, m in dit.named_modules() if handle.owns_block(m)]
                    self.lora_layers[name] = _offloaded_lora_layers()(blocks)
        return original(self)

    return convert_to_lora_layers


class _HookState:
    """What FastVideo's LayerwiseOffloadState means here: the block (`module_ref`), the device, and
    the block's weights in the host store. Its copy stream, GPU copies and methods have no
    counterpart: the engine moves the weights."""

    def __init__(self, handle: offloader.OffloadHandle, block: torch.nn.Module):
        self._handle = weakref.ref(handle)  # the block holds this; the handle must die with the model
        self.module_ref = block
        self.device = handle.device

    def live_handle(self) -> offloader.OffloadHandle:
        handle = self._handle()
        if handle is None or not handle.enabled:
            raise RuntimeError(f"fastvideo_offload: the offload of this {type(self.module_ref).__name__} was disabled")
        return handle

    @property
    def cpu_named_parameters(self) -> dict[str, torch.Tensor]:
        """The block's offloaded parameters in the host store, by their names in the block (FastVideo
        keeps pinned copies there). Read them; change weights inside `mutate_params_scope()`, which
        also refreshes the device's copies."""
        self.live_handle()
        params = dict(self.module_ref.named_parameters())
        # Under offload a block's state_dict gives the host store's tensor for each offloaded parameter.
        return {name: value for name, value in self.module_ref.state_dict(keep_vars=True).items()
                if name in params and value is not params[name]}


@functools.cache
def _hook_class():
    from fastvideo.hooks.hooks import ForwardHook

    class OffloadHook(ForwardHook):
        """The "LayerwiseOffloadHook" of an offloaded block in FastVideo's ModuleHookManager. The
        engine's own torch hooks stream the block, so its forward methods pass through."""

        def __init__(self, handle: offloader.OffloadHandle, block: torch.nn.Module):
            self.state = _HookState(handle, block)

        @classmethod
        def name(cls) -> str:
            return "LayerwiseOffloadHook"

        def mutate_params_scope(self):
            return self.state.live_handle().mutate(self.state.module_ref)

        def on_detach(self, module):
            raise NotImplementedError(
                f"fastvideo_offload: {type(module).__name__} cannot leave the offload alone: the engine streams "
                "the blocks of a model as one (one host store, one execution order, one state_dict). "
                "fastvideo_offload.disable(model) puts every block back on the device, bit-exact; the hook stays"
            )

    return OffloadHook


def _register_hooks(model: torch.nn.Module, handle: offloader.OffloadHandle) -> None:
    """FastVideo's hook entry on each offloaded block, for code that looks for its offload there."""
    from fastvideo.hooks.hooks import ModuleHookManager

    for _, block in model.named_modules():
        if handle.owns_block(block):
            ModuleHookManager.get_from_or_default(block).append_forward_hook(_hook_class()(handle, block))


def _wrap_hook_ctx(original):
    def get_hook_ctx(module):
        if module is not None:
            for handle in registry.group_handles(GROUP):
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
            model = original(self, model_path, fastvideo_args, *args, **kwargs)
        finally:
            _loading.to_host = previous
        if to_host:
            _place(model)
        return model

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
        (getattr(lora_pipeline, "LoRAPipeline", None), f"{lora_pipeline.__name__}.LoRAPipeline",
         "convert_to_lora_layers", _wrap_lora_conversion),
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
