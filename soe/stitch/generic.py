"""One-way stitching into (or out of) a model that has no soe plugin.

The hook engine needs nothing but a block list, the model's own forward and how its tokens map to
time. :class:`BlockListExpert` wraps any ``nn.Module`` given exactly that; :func:`stitch_into` builds
a one-way Stitcher from a registered source expert into such a host::

    host = LTXVideoTransformer3DModel(...)                      # no soe plugin anywhere
    st = soe.stitch_into(host, soe.get_expert("ace-step-1.5").tiny(),
                         layout_fn=lambda b: soe.TokenLayout((f, h, w), ("t", "h", "w"), 25 / 8))
    pred_audio, pred_video = st(audio_batch, host_kwargs)      # host batch = the model's own kwargs

The block list is given as a module path (``"transformer_blocks"``) or found with ``"auto"``: the
largest ``nn.ModuleList`` of identical blocks, failing with the candidates listed when none or
several similar-sized lists exist. (diffusers' own block hooks, e.g. its caches, instead look for
fixed attribute names such as ``blocks``, ``transformer_blocks`` or ``layers``; "auto" also finds a
list under any other name, and refuses to guess between two similar ones.)
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from soe.errors import SoeError
from soe.plugin.expert import Batch, Expert, TokenLayout

AMBIGUITY = 0.5  # a runner-up list with at least half the parameters of the largest makes "auto" ambiguous


class BlockListError(SoeError, ValueError):
    """No usable block list at the given path, or "auto" found none or several."""


@dataclass(frozen=True)
class BlockListCandidate:
    path: str
    length: int
    block_type: str
    num_params: int

    def __str__(self) -> str:
        return f"'{self.path}' ({self.length} x {self.block_type}, {self.num_params:,} parameters)"


def block_list_candidates(model: nn.Module) -> list[BlockListCandidate]:
    """Every ``nn.ModuleList`` of >= 2 blocks of one class, outermost only, largest first."""
    found: list[BlockListCandidate] = []
    for path, m in model.named_modules():
        if not (isinstance(m, nn.ModuleList) and len(m) >= 2 and len({type(c) for c in m}) == 1):
            continue
        if any(path.startswith(c.path + ".") for c in found):  # lists inside a block of another list
            continue
        found.append(BlockListCandidate(path, len(m), type(m[0]).__name__, sum(p.numel() for p in m.parameters())))
    return sorted(found, key=lambda c: -c.num_params)


def find_block_list(model: nn.Module, blocks: str = "auto") -> tuple[str, nn.ModuleList]:
    """``(path, module_list)`` for a module path or ``"auto"``; clear errors list the candidates."""
    candidates = block_list_candidates(model)
    listing = "; ".join(map(str, candidates)) or "none"
    name = type(model).__name__
    if blocks != "auto":
        try:
            found = model.get_submodule(blocks)
        except AttributeError:
            raise BlockListError(f"{name} has no submodule '{blocks}'; block-list candidates: {listing}") from None
        if not isinstance(found, nn.ModuleList) or len(found) == 0:
            raise BlockListError(f"{name}.{blocks} is a {type(found).__name__}, not a non-empty nn.ModuleList; "
                                 f"block-list candidates: {listing}")
        return blocks, found
    if not candidates:
        raise BlockListError(f"{name} has no nn.ModuleList of repeated blocks; pass blocks='path.to.list'")
    if len(candidates) > 1 and candidates[1].num_params >= AMBIGUITY * candidates[0].num_params:
        raise BlockListError(f"{name} has several block lists of similar size, pass one as blocks='...': {listing}")
    return candidates[0].path, model.get_submodule(candidates[0].path)


def _first_tensor(output) -> torch.Tensor:
    """A model output as one tensor: ``.sample`` of diffusers outputs, first element of tuples."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "sample"):
        return output.sample
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"cannot take a prediction tensor out of a {type(output).__name__}; pass forward_fn")


def _infer_hidden_size(block: nn.Module) -> int:
    for m in block.modules():  # a block normally opens with a norm or a projection of its width
        if isinstance(m, nn.LayerNorm) and m.normalized_shape:
            return int(m.normalized_shape[-1])
        if isinstance(m, nn.Linear):
            return m.in_features
    raise BlockListError(f"cannot infer the hidden size of {type(block).__name__}; pass hidden_size=")


class BlockListExpert(Expert):
    """Any ``nn.Module`` as a one-way stitch partner (host or source) for the hook engine.

    ``layout_fn(batch) -> TokenLayout``: how the block hidden state's tokens map to time.
    ``forward_fn(model, batch) -> Tensor``: the model's own forward on a batch (default:
    ``model(**batch)``, first tensor of the output). ``hidden_index``: position of the hidden state in
    a block's tuple output. There is no split forward, so it cannot take part in a two-way stitch.
    """

    batch_contract = False  # batches are the model's own forward arguments, not soe's latents/timestep/conditions

    def __init__(self, model: nn.Module, layout_fn: Callable[[Batch], TokenLayout], blocks: str = "auto",
                 forward_fn: Callable[[nn.Module, Batch], torch.Tensor] | None = None, hidden_size: int | None = None,
                 hidden_index: int = 0, name: str | None = None, modality: str = "unknown"):
        super().__init__(model)
        self.blocks_path, found = find_block_list(model, blocks)  # only the path: no second copy in state_dict
        self._layout_fn, self._forward_fn = layout_fn, forward_fn
        self._hidden_size = hidden_size or _infer_hidden_size(found[0])
        self.hidden_index = hidden_index
        self.name, self.modality = name or type(model).__name__, modality  # per instance: no registry entry

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.blocks_path)

    @property
    def hidden_size(self) -> int:
        return self._hidden_size

    def forward(self, batch: Batch) -> torch.Tensor:
        if self._forward_fn is not None:
            return self._forward_fn(self.model, batch)
        return _first_tensor(self.model(**batch))

    def token_layout(self, batch: Batch) -> TokenLayout:
        return self._layout_fn(batch)

    def block_output_hidden(self, output) -> torch.Tensor:
        return output[self.hidden_index] if isinstance(output, (tuple, list)) else output

    def with_block_output_hidden(self, output, hidden: torch.Tensor):
        if isinstance(output, (tuple, list)):
            out = list(output)
            out[self.hidden_index] = hidden
            return type(output)(out)
        return hidden

    def _no_split(self, *args, **kwargs):
        raise NotImplementedError(f"{self.name} is wrapped by BlockListExpert: it has no split forward, so it can only be "
                                  "stitched one-way (direction a_to_b or b_to_a, hook engine)")

    embed = run_block = head = _no_split

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, blocks={self.blocks_path!r} ({len(self.blocks)})"


def stitch_into(host: nn.Module, source: Expert, layout_fn: Callable[[Batch], TokenLayout] | None = None,
                blocks: str = "auto", forward_fn=None, pairs="linear", connector=None, detach_source: bool = True,
                hidden_size: int | None = None, hidden_index: int = 0, modality: str = "unknown"):
    """A one-way Stitcher ``source -> host``; ``host`` is any module (wrapped) or an Expert.

    Call it as ``stitcher(source_batch, host_batch) -> (source_prediction, host_prediction)``.
    """
    from soe.stitch.stitcher import Stitcher

    if not isinstance(host, Expert):
        if layout_fn is None:
            raise BlockListError("stitch_into: a host without a plugin needs layout_fn(batch) -> TokenLayout")
        host = BlockListExpert(host, layout_fn, blocks=blocks, forward_fn=forward_fn, hidden_size=hidden_size,
                               hidden_index=hidden_index, modality=modality)
    return Stitcher(source, host, pairs=pairs, direction="a_to_b", engine="hooks", detach_source=detach_source,
                    connector=connector, device=source.device)


__all__ = ["BlockListCandidate", "BlockListError", "BlockListExpert", "block_list_candidates", "find_block_list", "stitch_into"]
