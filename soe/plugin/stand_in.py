"""Shape-only stand-ins of expert models: what ``soe inspect`` builds instead of the model itself.

``soe inspect`` shows what a stitch would build (blocks, widths, connector shapes, inserted blocks,
new key/value projections, hooks, parameter counts) on the meta device. Building the real model
means importing its library first: diffusers' model modules pull in every diffusers transformer,
transformers, peft and torch's compiler, seconds before the first layer exists. A family may instead
describe its model from its config with plain torch modules (``Expert.stand_in``):

* its **blocks** with the real module and parameter names and shapes (``nn.Linear``/``nn.Conv1d``
  where the model has them, :class:`Attention` for a diffusers attention module, :class:`Params`
  for any other module with parameters), so taps, key/value injection, inserted blocks, hooks and
  LoRA counts are computed by the same Stitcher code as for the real model;
* everything outside the blocks as one parameter of the right size (:class:`StandInModel`);
* the model's ``config`` (all constructor arguments, defaults filled in), which the expert's own
  properties read (hidden size, depth, longest clip).

The Stitcher then runs as usual on the stand-ins (connectors too: :func:`shapes_only` makes them use
:data:`MLP_STAND_INS` instead of importing timm). Nothing here runs a forward. A stand-in that
disagrees with the real model would make ``soe inspect`` print wrong numbers, so each one is checked
against the meta-built model: ``soe experts check`` (``meta_presets``) for every preset, and
tests/test_stand_in.py for every shipped recipe (the whole ``soe inspect`` output must be equal).
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Iterator

import torch
from torch import nn

_SHAPES_ONLY = contextvars.ContextVar("soe_shapes_only", default=False)


@contextlib.contextmanager
def shapes_only() -> Iterator[None]:
    """Connectors built inside use :data:`MLP_STAND_INS` (same names and shapes, no timm import)."""
    token = _SHAPES_ONLY.set(True)
    try:
        yield
    finally:
        _SHAPES_ONLY.reset(token)


def is_shapes_only() -> bool:
    return _SHAPES_ONLY.get()


def linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    """An ``nn.Linear`` on meta, without running its initialisation (nothing to initialise on meta)."""
    layer = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = in_features, out_features
    layer.weight = nn.Parameter(torch.empty(out_features, in_features, device="meta"))
    layer.register_parameter("bias", nn.Parameter(torch.empty(out_features, device="meta")) if bias else None)  # as nn.Linear does
    return layer


class Params(nn.Module):
    """A module holding parameters of the given shapes (norms, tables, embeddings): ``Params(weight=(d,))``."""

    def __init__(self, **shapes: tuple[int, ...]):
        super().__init__()
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, device="meta")))

    def forward(self, *args, **kwargs):
        raise RuntimeError("a soe.plugin.stand_in module holds shapes only; build the real model to run it")


class _StandInProcessor:
    """What an :class:`Attention` stand-in holds as its processor (soe wraps it when it injects keys)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        raise RuntimeError("a soe.plugin.stand_in attention holds shapes only; build the real model to run it")


class Attention(Params):
    """A diffusers attention module's parameters: ``to_q``, ``to_k``, ``to_v``, ``to_out`` (linear,
    dropout) and any further modules (``norm_k=Params(weight=(d,))``, ``add_k_proj=linear(...)``), plus
    ``heads`` and the processor interface soe's key/value injection uses."""

    def __init__(self, query_dim: int, inner_dim: int, heads: int, kv_dim: int | None = None, kv_inner_dim: int | None = None,
                 out_dim: int | None = None, bias: bool = True, out_bias: bool | None = None, **modules: nn.Module):
        super().__init__()
        kv_dim, kv_inner_dim = kv_dim or query_dim, kv_inner_dim or inner_dim  # grouped-query attention: fewer k/v heads
        self.heads = heads
        self.to_q = linear(query_dim, inner_dim, bias)
        self.to_k = linear(kv_dim, kv_inner_dim, bias)
        self.to_v = linear(kv_dim, kv_inner_dim, bias)
        self.to_out = nn.ModuleList([linear(inner_dim, out_dim or query_dim, bias if out_bias is None else out_bias), nn.Dropout(0.0)])
        for name, module in modules.items():
            setattr(self, name, module)
        self.processor = _StandInProcessor()

    def set_processor(self, processor) -> None:
        self.processor = processor


class StandInModel(nn.Module):
    """A model stand-in: ``config`` (attribute access, like diffusers' FrozenDict), the blocks under
    the model's own attribute name (``blocks``, ``transformer_blocks``, ...) and one parameter
    ``outside_blocks`` with as many elements as all parameters outside the blocks together."""

    def __init__(self, config: dict, blocks_attr: str, blocks: list[nn.Module], outside_blocks: int, **attrs):
        super().__init__()
        self.config = Config(config)
        setattr(self, blocks_attr, nn.ModuleList(blocks))
        self.outside_blocks = nn.Parameter(torch.empty(outside_blocks, device="meta"))
        for name, value in attrs.items():
            setattr(self, name, value)

    def forward(self, *args, **kwargs):
        raise RuntimeError("a soe.plugin.stand_in model holds shapes only; build the real model to run it")


class Config(dict):
    """A dict whose keys read as attributes (``config.num_layers``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def full_config(defaults: dict, config: dict, model: str) -> dict:
    """``config`` over the model's constructor ``defaults``; an unknown key is the TypeError the model would raise."""
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise TypeError(f"{model}.__init__() got an unexpected keyword argument '{unknown[0]}'")
    return {**defaults, **config}


def constructor_defaults(cls) -> dict:
    """The keyword defaults of ``cls.__init__`` (tests compare a family's copy with the real model's)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return {p.name: p.default for p in params if p.kind is p.POSITIONAL_OR_KEYWORD}


# ---- connector MLPs (timm's Mlp, GluMlp, SwiGLU: the same module names and shapes) -------------------
class _Mlp(Params):
    def __init__(self, in_features, hidden_features, out_features, act_layer=None, device=None, dtype=None, glu=False):
        super().__init__()
        self.fc1 = linear(in_features, hidden_features)
        self.act, self.drop1, self.norm = nn.Identity(), nn.Dropout(0.0), nn.Identity()
        if glu and hidden_features % 2:
            raise ValueError(f"stitch.connector: a glu connector needs an even hidden width, got {hidden_features}")
        self.fc2 = linear(hidden_features // 2 if glu else hidden_features, out_features)
        self.drop2 = nn.Dropout(0.0)


class _GluMlp(_Mlp):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs, glu=True)


class _SwiGLU(Params):
    def __init__(self, in_features, hidden_features, out_features, act_layer=None, device=None, dtype=None):
        super().__init__()
        self.fc1_g, self.fc1_x = linear(in_features, hidden_features), linear(in_features, hidden_features)
        self.act, self.drop1, self.norm = nn.Identity(), nn.Dropout(0.0), nn.Identity()
        self.fc2 = linear(hidden_features, out_features)
        self.drop2 = nn.Dropout(0.0)


MLP_STAND_INS = {"mlp": _Mlp, "glu": _GluMlp, "swiglu": _SwiGLU}


# ---- checking a stand-in against the model -----------------------------------------------------------
def _plain(v):
    return tuple(_plain(x) for x in v) if isinstance(v, (list, tuple)) else v


def differences(stand_in: nn.Module, real: nn.Module) -> list[str]:
    """Where the stand-in expert ``stand_in`` differs from ``real`` (the same expert built on meta) in
    anything ``soe inspect`` and ``soe experts --details`` read: depth, width, latent and token rates,
    longest clip, config, parameter count, and each
    block's modules (names; linear, convolution and attention modules alike) and parameter shapes.
    Empty when they agree."""
    out = []
    for what in ("num_blocks", "hidden_size", "latent_rate", "token_rate"):
        mine, theirs = getattr(stand_in, what, None), getattr(real, what, None)
        if mine != theirs:
            out.append(f"{what}: stand-in {mine}, model {theirs}")
    if stand_in.max_seconds() != real.max_seconds():
        out.append(f"max_seconds(): stand-in {stand_in.max_seconds()}, model {real.max_seconds()}")
    counts = [sum(p.numel() for p in e.model.parameters()) for e in (stand_in, real)]
    if counts[0] != counts[1]:
        out.append(f"parameters: stand-in {counts[0]:,}, model {counts[1]:,} ({counts[0] - counts[1]:+,})")
    config = {k: _plain(v) for k, v in real.model.config.items() if not k.startswith("_")}
    mine = {k: _plain(v) for k, v in stand_in.model.config.items()}
    if mine != config:
        keys = sorted(k for k in set(mine) | set(config) if mine.get(k, "?") != config.get(k, "?"))
        out.append(f"config differs at {keys}")
    for i, (s, r) in enumerate(zip(stand_in.blocks, real.blocks)):
        shapes = [{n: tuple(p.shape) for n, p in b.named_parameters()} for b in (s, r)]
        if shapes[0] != shapes[1]:
            diff = sorted(set(shapes[0].items()) ^ set(shapes[1].items()))
            out.append(f"block {i}: parameter shapes differ (stand-in ^ model: {diff[:4]})")
        modules = [dict(b.named_modules()) for b in (s, r)]
        if set(modules[0]) != set(modules[1]):
            out.append(f"block {i}: module names differ (stand-in ^ model: {sorted(set(modules[0]) ^ set(modules[1]))[:4]})")
        for name, m in modules[1].items():
            other = modules[0].get(name)
            kinds = [type(x) if isinstance(x, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)) else
                     ("attention", x.heads) if hasattr(x, "set_processor") else None for x in (other, m)]
            if other is not None and kinds[0] != kinds[1]:
                out.append(f"block {i}: '{name}' is {kinds[0]} in the stand-in, {kinds[1]} in the model")
        if out:
            break
    return out
