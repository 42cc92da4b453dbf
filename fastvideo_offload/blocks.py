"""Finding a model's lists of transformer blocks."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


def _looks_like_blocks(modules: nn.ModuleList) -> bool:
    """A list of one kind of composite module with weights: Wan's `blocks`, Flux's
    `single_transformer_blocks`; not a list of Linear projections or of mixed layers."""
    children = list(modules)
    if not children or len({type(c) for c in children}) != 1:
        return False
    first = children[0]
    if isinstance(first, _CONTAINERS) or not any(True for _ in first.children()):
        return False
    return all(any(True for _ in c.parameters()) for c in children)


def find_block_lists(model: nn.Module, paths: Sequence[str] | None = None) -> list[tuple[str, nn.ModuleList]]:
    """Every list of transformer blocks in `model`, in registration order.

    With `paths`, exactly those attribute paths (for example ``["blocks"]`` or
    ``["model.transformer_blocks"]``); otherwise every `nn.ModuleList` of blocks at any depth,
    not looking inside a list already found.
    """
    if paths is not None:
        if isinstance(paths, str) or not all(isinstance(p, str) for p in paths):
            raise TypeError(f"blocks must be a list of attribute paths (strings), got {paths!r}")
        found = []
        for path in paths:
            try:
                module = model.get_submodule(path)
            except AttributeError as exc:
                raise ValueError(f"blocks: {type(model).__name__} has no submodule {path!r}") from exc
            if not isinstance(module, nn.ModuleList):
                raise TypeError(f"blocks: {path!r} is a {type(module).__name__}, not an nn.ModuleList of blocks")
            found.append((path, module))
        if not found:
            raise ValueError("blocks: the list of block paths is empty")
        return found

    found = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix, _ in found):
            continue
        if isinstance(module, nn.ModuleList) and _looks_like_blocks(module):
            found.append((name, module))
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no nn.ModuleList of transformer blocks; pass blocks=['path.to.list'] "
            "to name the lists to offload"
        )
    return found
