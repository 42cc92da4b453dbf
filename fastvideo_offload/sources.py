"""Where `enable` takes the weights from: the one step that differs between offloading a loaded
model and loading one straight from a checkpoint (checkpoint.py). A source

- `check(model)`: refuses, before anything changes, a model it cannot give every weight;
- `host_stores(blocks, pin, device)`: yields each block's filled host store in order, given
  `(names, params)` per block, each pinned or staged as `pin` (pinning.PinPlan) decides; a parameter
  leaves it holding real bytes (the engine refuses meta);
- `resident(tensor, device)`: a parameter or buffer that stays out of the blocks, on `device`
  (`tensor` itself where nothing changes).

For a node's shared store (share.py), which lays the stores out itself:
- `identity(blocks)`: what the node's ranks must agree on before one of them fills the store
  (None: the weights themselves, compared byte for byte after the fill);
- `fill(stores)`: writes each block's weights into its store;
- `adopt(store)`: the block's parameters hold real bytes afterwards.

`label` names the work on the progress bar."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from . import formats
from .pinning import PinPlan
from .store import BlockStore, span


def assign(p: nn.Parameter, data: torch.Tensor) -> None:
    """`p.data = data`, also onto or off the meta device, whose tensors cannot take another
    device's data: there `p` swaps contents with a new parameter and keeps its identity, which
    the handle's bookkeeping and tied weights rely on."""
    if p.is_meta == data.is_meta:
        p.data = data
    else:
        torch.utils.swap_tensors(p, nn.Parameter(data, requires_grad=p.requires_grad))


class LiveWeights:
    """The model's own tensors: block parameters are packed out of wherever they are."""

    label = "packing blocks"

    def check(self, model: nn.Module) -> None:
        meta = [n for n, p in model.named_parameters() if p.is_meta]
        if meta:
            raise ValueError(
                f"parameters {meta[:3]}{'...' if len(meta) > 3 else ''} are on the meta device; load real weights "
                "(for example with load_state_dict(..., assign=True)), or pass checkpoint=PATH to read them "
                "from a safetensors checkpoint"
            )

    def host_stores(
        self, blocks: list[tuple[list[str], list[nn.Parameter]]], pin: PinPlan, device: torch.device | None
    ) -> Iterator[BlockStore]:
        for names, params in blocks:
            yield pin.store(BlockStore.nbytes(params), lambda pinned: BlockStore.pack(names, params, pinned, device))

    def identity(self, blocks) -> None:
        return None

    def fill(self, stores: list[BlockStore]) -> None:
        with torch.no_grad():
            for store in stores:
                for holder, view in zip(store.params, store.views):
                    span(view).copy_(span(formats.plain(holder)))

    def adopt(self, store: BlockStore) -> None:
        pass  # the parameters hold their own bytes until the engine swaps them out

    def resident(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        # Already on the device: the tensor itself, so a buffer keeps its object and a parameter its data.
        return tensor.to(device)
