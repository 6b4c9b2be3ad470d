"""Connectors: the light MLPs that carry one expert's hidden state into another's.

A connector reads the source block's tokens ``(B, N_src, D_src)``, pools them to one vector per
time step (their mean, or with ``pool: moments`` also where in the frame they are), resamples
those to the host's time steps by seconds, maps them with an MLP to the host width and
broadcasts them over the host's non-time axes. Its output layer starts at zero, so a
freshly stitched model reproduces both experts exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import GluMlp, Mlp, SwiGLU
from torch import nn

from soe.align import MOMENT_SLOTS, broadcast_to_grid, pool_steps, resample_time
from soe.expert import TokenLayout

MLP_TYPES = {"mlp": Mlp, "glu": GluMlp, "swiglu": SwiGLU}
ACTIVATIONS = {"silu": nn.SiLU, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "relu": nn.ReLU}
INITS = ("zero", "trunc_normal")
RESAMPLE_MODES = ("auto", "linear", "area")
POOL_MODES = ("mean", "moments")


@dataclass(frozen=True)
class ConnectorSpec:
    """How every connector of a stitch is built.

    ``hidden=None`` means ``D_src + D_host`` (UniVerse-1's Linear(Da, Da+Dv)-SiLU-Linear(Da+Dv, Dv)).
    ``init="zero"`` zeroes the output layer (step 0 equals the unstitched experts);
    ``"trunc_normal"`` gives it small random weights (tests, ablations).
    """

    mlp: str = "mlp"
    hidden: int | None = None
    act: str = "silu"
    init: str = "zero"
    resample: str = "auto"
    input_norm: bool = False  # LayerNorm on the pooled source state before the MLP
    # "mean" (UniVerse-1): the tokens of a time step averaged; "moments": mean + first moments along
    # the source grid's rows and columns (soe.align.pool_time_moments), 3x the MLP's input width
    pool: str = "mean"

    def __post_init__(self):
        if self.mlp not in MLP_TYPES:
            raise ValueError(f"connector.mlp: expected one of {sorted(MLP_TYPES)}, got {self.mlp!r}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"connector.act: expected one of {sorted(ACTIVATIONS)}, got {self.act!r}")
        if self.init not in INITS:
            raise ValueError(f"connector.init: expected one of {list(INITS)}, got {self.init!r}")
        if self.resample not in RESAMPLE_MODES:
            raise ValueError(f"connector.resample: expected one of {list(RESAMPLE_MODES)}, got {self.resample!r}")
        if self.pool not in POOL_MODES:
            raise ValueError(f"connector.pool: expected one of {list(POOL_MODES)}, got {self.pool!r}")
        if self.hidden is not None and (not isinstance(self.hidden, int) or self.hidden < 1):
            raise ValueError(f"connector.hidden: expected a positive integer or null (= D_src + D_host), got {self.hidden!r}")

    def hidden_size(self, src_dim: int, dst_dim: int) -> int:
        return self.hidden if self.hidden is not None else src_dim + dst_dim


class Connector(nn.Module):
    """One direction at one block pair: source tokens -> additive update of the host tokens."""

    def __init__(self, src_dim: int, dst_dim: int, spec: ConnectorSpec = ConnectorSpec(), device=None, dtype=None):
        super().__init__()
        self.src_dim, self.dst_dim, self.resample, self.pool = src_dim, dst_dim, spec.resample, spec.pool
        self.in_width = width = src_dim * (MOMENT_SLOTS if spec.pool == "moments" else 1)  # what the MLP reads
        self.norm = nn.LayerNorm(width, device=device, dtype=dtype) if spec.input_norm else nn.Identity()
        self.mlp = MLP_TYPES[spec.mlp](
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

    def forward(self, src: torch.Tensor, src_layout: TokenLayout, dst_layout: TokenLayout) -> torch.Tensor:
        steps = self.pool_steps(src, src_layout)  # (B, T_src, D_src or 3 * D_src)
        steps = resample_time(steps, src_layout, dst_layout, self.resample)  # (B, T_dst, D_src)
        steps = self.mlp(self.norm(steps))  # (B, T_dst, D_dst)
        return broadcast_to_grid(steps, dst_layout)  # (B, N_dst, D_dst)

    def pool_steps(self, src: torch.Tensor, src_layout: TokenLayout) -> torch.Tensor:
        """The source tokens as one vector per source time step, as this connector's ``pool`` says."""
        return pool_steps(src, src_layout, self.pool)

    def extra_repr(self) -> str:
        return f"{self.src_dim} -> {self.dst_dim}, pool={self.pool}, resample={self.resample}"
