"""Finding a model's lists of transformer blocks.

A block is a module that is called (its forward runs, so its hooks can load its weights) and
that holds weights. Discovery walks the model and takes as a list of blocks:

- an `nn.ModuleList` whose members, once member containers are opened, are composite modules
  (modules with submodules), at least one with weights. Members may differ in type (a double
  and a single block in one list); weightless ones (a pruned or identity block) are left out.
  A member without a forward of its own (an `nn.ModuleList`, an `nn.ModuleDict`) is never
  called, so hooks on it would never run: its own members stand in for it. ConsisID's
  `local_facial_extractor.layers`, a list of [attention, feed-forward] ModuleLists, gives both
  modules of every pair as blocks.
- an `nn.Sequential` of at least two composite modules of one type, each with weights, that
  are not torch containers themselves: LongCat audio DiT's `text_conv_layer` of ConvNeXt blocks.
  An MLP's `Sequential(Linear, GELU, Linear)` is not one: a Sequential is mostly how layers
  are chained inside a module, and only a stack of one kind of composite module is a stack of
  blocks.

A list of plain layers (Linear projections, a Linear beside a Dropout) is not a list of blocks.
The walk does not look inside a list it took, so a block's own lists stay part of the block.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)

#: A list of blocks: its path in the model, and its blocks with their paths in the model.
BlockList = tuple[str, list[tuple[str, nn.Module]]]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _never_called(module: nn.Module) -> bool:
    # Without a forward of its own, calling the module raises: code only iterates or indexes it.
    return type(module).forward is nn.Module.forward


def _called_members(path: str, modules: nn.Module) -> list[tuple[str, nn.Module]]:
    """The members of a list, with the members of uncalled containers in their place."""
    members = []
    for name, module in modules.named_children():
        if _never_called(module):
            members += _called_members(_join(path, name), module)
        else:
            members.append((_join(path, name), module))
    return members


def _has_weights(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _is_composite(module: nn.Module) -> bool:
    return any(True for _ in module.children())


def _blocks_of_module_list(path: str, modules: nn.ModuleList) -> list[tuple[str, nn.Module]]:
    members = [(name, m) for name, m in _called_members(path, modules) if _has_weights(m)]
    if not members or not all(_is_composite(m) for _, m in members):
        return []
    return members


def _blocks_of_sequential(path: str, modules: nn.Sequential) -> list[tuple[str, nn.Module]]:
    members = list(modules.named_children())
    kinds = {type(m) for _, m in members}
    if len(members) < 2 or len(kinds) != 1 or issubclass(kinds.pop(), _CONTAINERS):
        return []
    if not all(_is_composite(m) and _has_weights(m) for _, m in members):
        return []
    return [(_join(path, name), m) for name, m in members]


def _discover(path: str, module: nn.Module, found: list[BlockList]) -> None:
    if isinstance(module, nn.ModuleList):
        blocks = _blocks_of_module_list(path, module)
    elif isinstance(module, nn.Sequential):
        blocks = _blocks_of_sequential(path, module)
    else:
        blocks = []
    if blocks:
        found.append((path, blocks))
        return
    for name, child in module.named_children():
        _discover(_join(path, name), child, found)


def _named_list(model: nn.Module, path: str) -> BlockList:
    try:
        module = model.get_submodule(path)
    except AttributeError as exc:
        raise ValueError(f"blocks: {type(model).__name__} has no submodule {path!r}") from exc
    if not isinstance(module, (nn.ModuleList, nn.Sequential)):
        raise TypeError(
            f"blocks: {path!r} is a {type(module).__name__}, not an nn.ModuleList or nn.Sequential of blocks"
        )
    uncalled = [name for name, m in module.named_children() if _never_called(m)]
    if uncalled:
        kind = type(module.get_submodule(uncalled[0])).__name__
        raise ValueError(
            f"blocks: the items of {path!r} ({', '.join(uncalled[:3])}{'...' if len(uncalled) > 3 else ''}) are "
            f"{kind} modules, which are never called (a {kind} has no forward), so their weights would "
            "never be loaded; name lists of the modules that are called, or leave blocks=None to offload "
            "those modules"
        )
    return path, [(_join(path, name), m) for name, m in module.named_children()]


def find_block_lists(model: nn.Module, paths: Sequence[str] | None = None) -> list[BlockList]:
    """Every list of transformer blocks in `model`, in registration order, each with its blocks.

    With `paths`, exactly those attribute paths (for example ``["blocks"]`` or
    ``["model.transformer_blocks"]``), every item a block; otherwise every list of blocks at any
    depth, as the module docstring describes.
    """
    if paths is not None:
        if isinstance(paths, str) or not all(isinstance(p, str) for p in paths):
            raise TypeError(f"blocks must be a list of attribute paths (strings), got {paths!r}")
        if not paths:
            raise ValueError("blocks: the list of block paths is empty")
        return [_named_list(model, path) for path in paths]

    found: list[BlockList] = []
    _discover("", model, found)
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no nn.ModuleList of transformer blocks; pass blocks=['path.to.list'] "
            "to name the lists to offload"
        )
    return found
