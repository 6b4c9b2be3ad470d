"""Connectors: the light MLPs that carry one expert's hidden state into another's.

A connector reads the source block's tokens ``(B, N_src, D_src)``, pools them to one vector per
time step (their mean, or with ``pool: moments`` also where in the frame they are), resamples
those to the host's time steps by seconds, maps them with an MLP to the host width and
broadcasts them over the host's non-time axes. Its output layer starts at zero, so a
freshly stitched model reproduces both experts exactly.
"""
from __future__ import annotations

import torch
from torch import nn

from soe.plugin.expert import TokenLayout
from soe.schema.stitch import Activation, ConnectorConfig, ConnectorMlp
from soe.stitch.align import MOMENT_SLOTS, broadcast_to_grid, pool_steps, resample_time


def mlp_type(kind: ConnectorMlp) -> type[nn.Module]:
    """timm's MLP for ``kind`` (the names are declared once, in soe.schema.stitch). timm is imported
    here, not with this module: its import pulls in torchvision and torch's compiler (~1.5 s), which
    ``soe inspect`` does without (it builds shape-only stand-ins, soe/plugin/stand_in.py)."""
    from soe.plugin.stand_in import MLP_STAND_INS, is_shapes_only

    if is_shapes_only():
        return MLP_STAND_INS[ConnectorMlp(kind).value]
    from timm.layers import GluMlp, Mlp, SwiGLU

    return {ConnectorMlp.mlp: Mlp, ConnectorMlp.glu: GluMlp, ConnectorMlp.swiglu: SwiGLU}[kind]


ACTIVATIONS = {Activation.silu: nn.SiLU, Activation.gelu: nn.GELU, Activation.gelu_tanh: lambda: nn.GELU(approximate="tanh"),
               Activation.relu: nn.ReLU}


class Connector(nn.Module):
    """One direction at one block pair: source tokens -> additive update of the host tokens."""

    def __init__(self, src_dim: int, dst_dim: int, spec: ConnectorConfig | None = None, device=None, dtype=None):
        super().__init__()
        spec = spec if spec is not None else ConnectorConfig()
        self.src_dim, self.dst_dim, self.resample, self.pool = src_dim, dst_dim, spec.resample, spec.pool
        self.in_width = width = src_dim * (MOMENT_SLOTS if spec.pool == "moments" else 1)  # what the MLP reads
        self.norm = nn.LayerNorm(width, device=device, dtype=dtype) if spec.input_norm else nn.Identity()
        self.mlp = mlp_type(spec.mlp)(
            in_features=width,
            hidden_features=spec.hidden_size(src_dim, dst_dim),
            out_features=dst_dim,
            act_layer=ACTIVATIONS[spec.act],
            device=device,
            dtype=dtype,
        )
        self.reset_output(spec.init)

    @torch.no_grad()
    def reset_output(self, init: str = "zero") -> None:
        out = self.mlp.fc2
        if out.weight.device.type == "meta":
            return
        if init == "zero":  # zero-init so step 0 equals the unstitched experts
            nn.init.zeros_(out.weight)
        else:
            nn.init.trunc_normal_(out.weight, std=0.02)
        if out.bias is not None:
            nn.init.zeros_(out.bias)

    def forward(self, src: torch.Tensor, src_layout: TokenLayout, dst_layout: TokenLayout, src_split=None, dst_split=None) -> torch.Tensor:
        """``src_split`` / ``dst_split``: the ``ContextSplit`` of a side whose tokens are split across ranks
        (context parallel): this rank holds only its part of ``src``, and gets only its part of the output."""
        steps = self.pool_steps(src, src_layout, src_split)  # (B, T_src, D_src or 3 * D_src)
        steps = resample_time(steps, src_layout, dst_layout, self.resample)  # (B, T_dst, D_src)
        steps = self.map_steps(steps)  # (B, T_dst, D_dst)
        return dst_split.broadcast(steps, dst_layout) if dst_split is not None else broadcast_to_grid(steps, dst_layout)  # (B, N_dst, D_dst)

    def map_steps(self, steps: torch.Tensor) -> torch.Tensor:
        """The MLP: ``(B, T, in_width)`` per-step vectors -> ``(B, T, dst_dim)``, computed in the connector's own
        dtype (float32 connectors read bfloat16 experts when sampling without autocast; callers cast the result
        to the host's dtype). FSDP2 gathers the connector's parameters around this call too: attention k/v
        injection calls it directly."""
        return self.mlp(self.norm(steps.to(self.mlp.fc2.weight.dtype)))

    def pool_steps(self, src: torch.Tensor, src_layout: TokenLayout, split=None) -> torch.Tensor:
        """The source tokens as one vector per source time step, as this connector's ``pool`` says (``split``: the
        source's tokens are split across ranks; all-reduced partial sums)."""
        return split.pool(src, src_layout, self.pool) if split is not None else pool_steps(src, src_layout, self.pool)

    def extra_repr(self) -> str:
        return f"{self.src_dim} -> {self.dst_dim}, pool={self.pool}, resample={self.resample}"
