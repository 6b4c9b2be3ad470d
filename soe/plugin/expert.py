"""The expert contract: what soe needs to know about a pretrained diffusion transformer.

An expert plugin (``experts/*.py``) wraps one model family without editing its source. It exposes
the model's block list, a *split forward* (``embed`` -> ``run_block`` x N -> ``head``) that must
equal the model's own forward, and a :class:`TokenLayout` that says how the token sequence maps to
time in seconds. The Stitcher only ever talks to experts through this contract.
"""
from __future__ import annotations

import inspect

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

Batch = dict[str, Any]


def latent_frames(seconds: float, rate: float) -> int:
    """Latent frames covering a clip of ``seconds`` at ``rate`` latent frames per second: rounded UP,
    as every codec here produces them (Wan's causal VAE: ``1 + 4k`` frames -> ``k + 1`` latents, i.e.
    ``ceil(frames / 4)``; ACE-Step's DCAE pads the audio to whole latents; UniVerse-1's 25.6 kHz codec
    prepends a quarter latent). One rule for every expert, so a video and an audio expert at the same
    rate agree for the same clip (5.1 s at 6.25/s: 32 and 32)."""
    return max(1, math.ceil(round(seconds * rate, 6)))  # round(): 5.0 * 6.25 is 31.25, not 31.2500001


@dataclass(frozen=True)
class TokenLayout:
    """How a flat token sequence ``(B, N, D)`` maps onto a grid whose first axis is time.

    ``grid`` is the token grid, time first (``(t, h, w)`` for video, ``(t,)`` for audio), flattened
    in row-major order. ``time_rate`` is tokens per second along the time axis.
    """

    grid: tuple[int, ...]
    axes: tuple[str, ...]
    time_rate: float

    def __post_init__(self):
        if len(self.grid) != len(self.axes) or not self.grid:
            raise ValueError(f"TokenLayout: grid {self.grid} and axes {self.axes} must have the same non-zero length")
        if self.axes[0] != "t":
            raise ValueError(f"TokenLayout: the first axis must be time 't', got axes {self.axes}")
        if any(n <= 0 for n in self.grid):
            raise ValueError(f"TokenLayout: every grid size must be positive, got {self.grid}")
        if not self.time_rate > 0:
            raise ValueError(f"TokenLayout: time_rate must be > 0 tokens/s, got {self.time_rate}")

    @property
    def num_steps(self) -> int:
        """Number of time steps (size of the time axis)."""
        return self.grid[0]

    @property
    def tokens_per_step(self) -> int:
        """Tokens sharing one time step (product of the non-time axes)."""
        n = 1
        for g in self.grid[1:]:
            n *= g
        return n

    @property
    def num_tokens(self) -> int:
        return self.num_steps * self.tokens_per_step

    @property
    def seconds(self) -> float:
        return self.num_steps / self.time_rate

    def timestamps(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """Centre of each time step in seconds, shape ``(t,)``."""
        return (torch.arange(self.num_steps, device=device, dtype=dtype) + 0.5) / self.time_rate


@dataclass
class BlockState:
    """What flows between blocks of the split forward.

    ``hidden`` is the token sequence ``(B, N, D)`` that connectors read and add to; ``extras`` holds
    whatever else this expert's blocks need (timestep modulation, text states, rotary tables, ...).
    """

    hidden: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)

    def replace(self, hidden: torch.Tensor) -> "BlockState":
        return dataclasses.replace(self, hidden=hidden)


# Top-level files of a weight folder given as a Hub repo (a repo that is the model folder itself). Named
# exactly, not "*.safetensors": huggingface_hub's patterns are fnmatch, whose "*" also matches "/".
MODEL_FILES = ("config.json", "diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model.safetensors.index.json",
               "model*.safetensors", "model.safetensors.index.json", "soe_expert.json")
TEXT_FILES = ("config.json", "model*.safetensors", "model.safetensors.index.json", "tokenizer*", "spiece.model",
              "special_tokens_map.json", "vocab.json")


def hub_patterns(*subfolders: str, files: tuple[str, ...] = MODEL_FILES) -> tuple[str, ...]:
    """Allow patterns for a folder that is either a checkpoint root holding ``subfolders`` or one of them."""
    return (*(f"{s}/*" for s in subfolders), *files)


class Expert(nn.Module):
    """Base of every expert plugin. Subclasses wrap one model as ``self.model``.

    Batches are dicts. Every expert reads the noisy latent from ``batch["latents"]`` and the flow
    time ``batch["timestep"]`` as sigma in [0, 1] (shape ``(B,)``, or ``(B, T)`` per latent frame when
    ``frame_timesteps``); the plugin converts sigma to its
    model's own timestep convention. Conditioning keys are the plugin's own (see ``dummy_batch``).
    """

    name: ClassVar[str] = ""
    modality: ClassVar[str] = ""
    source: ClassVar[str] = ""  # where the model code comes from, e.g. "diffusers.WanTransformer3DModel"
    lora_targets: ClassVar[tuple[str, ...]] = ()  # regexes over module names of ``self.model``
    # Points inside a block a connector may read (soe/stitch/lockstep.py): name -> (module path in the block,
    # "input" | "output"), e.g. {"after_self_attn": ("cross_attn", "input")}.
    tap_points: ClassVar[dict[str, tuple[str, str]]] = {}
    presets: ClassVar[dict[str, dict]] = {}  # real-size configs by name, plus "tiny"
    # Which batch keys carry text conditioning (dropped for classifier-free guidance).
    condition_keys: ClassVar[tuple[str, ...]] = ()
    batch_contract: ClassVar[bool] = True  # batches hold latents, timestep, condition_keys (checked by soe.stitch.batch_check)
    # CFG's null branch: "zeros" (condition keys zeroed: ACE-Step, UniVerse-1's audio) or
    # "negative_prompt" (the text encoding of ``sample.negative_prompt``, default "": Wan's pipelines).
    null_condition: ClassVar[str] = "zeros"
    # Timestep shift of the family's flow schedule (sigma' = s*sigma / (1 + (s-1)*sigma)).
    flow_shift: ClassVar[float] = 1.0
    # Space of the training loss: "velocity" (plain MSE on eps - x0, Wan) or "x0" (MSE on
    # x0_pred = x_t - sigma * v, a sigma^2-weighted velocity loss, ACE-Step v1).
    flow_loss: ClassVar[str] = "velocity"
    # True when ``batch["timestep"]`` may also be ``(B, T)``: one sigma per latent frame (per-token
    # timesteps). Conditioning (soe/flow/conditioning.py) then gives clean frames timestep 0.
    frame_timesteps: ClassVar[bool] = False
    # The files a Hub repo id given for each weight key needs (``path``, ``codec_path``, ``text_encoder_path``):
    # huggingface_hub allow patterns, relative to the folder the key names (soe/hub.py); a key not listed
    # fetches that whole folder. ``hub_patterns("transformer")`` lists a diffusers pipeline's subfolder.
    hub_files: ClassVar[dict[str, tuple[str, ...]]] = {}
    license: ClassVar[str | None] = None  # the weights' license as the Hub names it (model cards of `soe export`); None: unknown

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict, device=None, dtype=None) -> "Expert":
        raise NotImplementedError

    @classmethod
    def option_names(cls) -> list[str] | None:
        """The expert's own options (``experts.<side>.options``): the keyword arguments of its constructor
        after the model. None when the constructor takes ``**kwargs`` (then any name is passed on)."""
        params = list(inspect.signature(cls.__init__).parameters.values())[2:]  # self, model
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return None
        return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    @classmethod
    def architecture_names(cls) -> list[str] | None:
        """The model-config keys a preset may be overridden with (``experts.<side>.architecture``); None
        (the default): not declared, the model's constructor alone judges them."""
        return None

    @classmethod
    def stand_in(cls, config: dict) -> "Expert | None":
        """This expert over a shape-only stand-in of its model (soe/plugin/stand_in.py), from the same ``config``
        as ``from_config``, built without importing the model's library: what ``soe inspect`` shows
        (blocks, widths, parameter counts, the hooks a stitch puts on them) in a fraction of a second.
        It must equal the model built on meta in all of that (``soe experts check``: ``meta_presets``).
        None (the default): no stand-in, ``soe inspect`` builds the model on the meta device."""
        return None

    @classmethod
    def from_preset(cls, preset: str, device=None, dtype=None, **overrides) -> "Expert":
        if preset not in cls.presets:
            raise KeyError(f"expert '{cls.name}' has no preset '{preset}'; known presets: {sorted(cls.presets)}")
        return cls.from_config({**cls.presets[preset], **overrides}, device=device, dtype=dtype)

    @classmethod
    def tiny(cls, seed: int = 0, **overrides) -> "Expert":
        """A genuinely small random-initialised instance for tests and the demo."""
        torch.manual_seed(seed)
        return cls.from_preset("tiny", **overrides)

    @classmethod
    def load(cls, path, dtype=None, device=None) -> "Expert":
        """Load real pretrained weights from a local folder in the family's official format."""
        raise NotImplementedError

    @classmethod
    def load_empty(cls, path, dtype=None, **options) -> tuple["Expert", Any]:
        """``load`` without reading a weight: the model at ``path`` with its parameters on the meta
        device (buffers real), and a ``soe.plugin.weights.FolderWeights`` over its files, keyed by the model's
        own parameter names. FSDP2 runs materialise each rank's shard from it (``soe.train.sharding``).
        It must leave the global RNG where ``load`` leaves it: connectors and LoRA adapters are drawn
        from that state, equal to a single-process build's. Families that rename tensors while
        loading leave this out; they are then loaded whole."""
        raise NotImplementedError(f"expert '{cls.name}' cannot be loaded shard by shard")

    def save(self, path) -> None:
        """Write the model in the family's official format (inverse of ``load``)."""
        raise NotImplementedError

    # ---- the block list and split forward ------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def hidden_size(self) -> int:
        raise NotImplementedError

    def embed(self, batch: Batch) -> BlockState:
        raise NotImplementedError

    def run_block(self, i: int, state: BlockState) -> BlockState:
        raise NotImplementedError

    def run_block_module(self, block: nn.Module, state: BlockState) -> BlockState:
        """Run ``block`` (e.g. one inserted by depth expansion) exactly as ``run_block`` runs its own
        blocks. Plugins that support ``depth: insert_interpolated`` implement it (and usually define
        ``run_block(i, s)`` as ``run_block_module(self.blocks[i], s)``)."""
        raise NotImplementedError(f"expert '{self.name}' cannot run a block that is not its own (needed by depth expansion)")

    def attention_qkv(self, attn: nn.Module, args: tuple, kwargs: dict):
        """Queries, keys, values ``(B, H, S|L, d)`` and additive mask ``(B, 1, S, L)`` or None that the
        processor of attention module ``attn`` forms from its call arguments (for ``attention_kv``
        injection: ``to_out(softmax(q k^T / sqrt(d) + mask) v)`` must equal the processor's output)."""
        raise NotImplementedError(f"expert '{self.name}' does not expose attention queries/keys (attention_kv injection)")

    def head(self, state: BlockState, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def split_forward(self, batch: Batch) -> torch.Tensor:
        """``head(blocks(embed(batch)))``; must equal ``forward(batch)`` (contract test)."""
        state = self.embed(batch)
        for i in range(self.num_blocks):
            state = self.run_block(i, state)
        return self.head(state, batch)

    def forward(self, batch: Batch) -> torch.Tensor:
        """The model's own native forward on a soe batch."""
        raise NotImplementedError

    # ---- how a block hands over its hidden state (for hooks on the native forward) --------------
    @staticmethod
    def block_input_hidden(args: tuple, kwargs: dict) -> torch.Tensor:
        """The hidden state among a block's call arguments (first positional, or ``hidden_states``)."""
        return args[0] if args else kwargs["hidden_states"]

    @staticmethod
    def block_output_hidden(output) -> torch.Tensor:
        """The hidden state inside a block's return value (tensor, or first element of a tuple)."""
        return output[0] if isinstance(output, (tuple, list)) else output

    @staticmethod
    def with_block_output_hidden(output, hidden: torch.Tensor):
        """``output`` with its hidden state replaced by ``hidden``."""
        if isinstance(output, tuple):
            return (hidden, *output[1:])
        if isinstance(output, list):
            return [hidden, *output[1:]]
        return hidden

    # ---- time and data -------------------------------------------------------------------------
    def token_layout(self, batch: Batch) -> TokenLayout:
        raise NotImplementedError

    @property
    def token_rate(self) -> float:
        """Tokens per second along time, read off the layout of a one-second dummy batch."""
        return self.token_layout(self.dummy_batch(1, seconds=1.0)).time_rate

    @property
    def latent_rate(self) -> float:
        """Latent frames per second along time. Plugins state it exactly; this default reads it off
        the latent length of a 10-second clip."""
        return self.latent_shape(1, 10.0)[self.latent_time_axis] / 10.0

    def latent_shape(self, batch_size: int, seconds: float) -> tuple[int, ...]:
        """Shape of the clean latent for a clip of ``seconds``."""
        raise NotImplementedError

    def max_seconds(self) -> float | None:
        """Longest clip the model can position (e.g. the length of its rotary table); None = no limit."""
        return None

    def batch_axes(self) -> dict[str, tuple[tuple[str, int | str | None], ...]]:
        """``{batch key: ((axis name, size), ...)}``, checked before a forward so a tensor of the wrong rank or
        width is one line naming the key, not a torch error deep in a layer. ``size``: an int (fixed, e.g.
        channels), None (any) or the name of a ``latents`` axis it must equal. Default: no constraint."""
        return {}

    def latent_multiples(self) -> dict[int, int]:
        """``{latent axis: size it must be a multiple of}`` (the patch sizes); checked before a forward,
        so a latent the patch embedding would silently crop is refused. Default: no constraint."""
        return {}

    def dummy_batch(self, batch_size: int = 1, seconds: float = 1.0, generator: torch.Generator | None = None) -> Batch:
        """A random batch with every key the model needs, at this expert's shapes."""
        raise NotImplementedError

    def conditioning(self, batch_size: int = 1, seconds: float = 1.0, generator: torch.Generator | None = None) -> Batch:
        """Everything a batch needs besides ``latents`` and ``timestep`` (for synthetic data)."""
        b = self.dummy_batch(batch_size, seconds, generator)
        return {k: v for k, v in b.items() if k not in ("latents", "timestep")}

    @property
    def latent_time_axis(self) -> int:
        """Axis of the batched latent that grows with clip length."""
        s1, s2 = self.latent_shape(1, 1.0), self.latent_shape(1, 2.0)
        return next(i for i, (x, y) in enumerate(zip(s1, s2)) if x != y)

    def codec(self, path=None, dtype=None):
        """This family's latent codec (``soe.plugin.codec.LatentCodec``): the real one from a local folder,
        or with ``path=None`` a tiny random one with this expert's latent shape (tests, demo)."""
        raise NotImplementedError(f"expert '{self.name}' declares no latent codec")

    def text_encoder(self, path, device=None, dtype=None):
        """This family's text encoder loaded from a local folder: a callable
        ``(prompts: list[str], lyrics: list[str] | None = None) -> Batch`` of conditioning tensors
        (batch axis first, exactly the keys ``dummy_batch`` has besides latents and timestep)."""
        raise NotImplementedError(f"expert '{self.name}' declares no text encoder")

    def unconditional(self, batch: Batch, negative: Batch | None = None) -> Batch:
        """The batch with text conditioning dropped, for classifier-free guidance: zeros, or the
        condition keys of ``negative`` (an encoded negative prompt) when ``null_condition`` says so."""
        out = dict(batch)
        use_negative = negative is not None and self.null_condition == "negative_prompt"
        for k in self.condition_keys:
            if k in out and out[k] is not None:
                if use_negative and k in negative:
                    n = out[k].shape[0]
                    neg = negative[k].to(out[k].device, out[k].dtype)
                    out[k] = neg if neg.shape[0] == n else neg[:1].expand(n, *neg.shape[1:])
                else:
                    out[k] = torch.zeros_like(out[k])
        return out

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute block activations in backward (native forward and split forward alike)."""
        self._soe_checkpointing = enabled

    @property
    def gradient_checkpointing(self) -> bool:
        return getattr(self, "_soe_checkpointing", False)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the execution device set by ``soe.sample.speed`` (weights may wait on the CPU), else the weights'."""
        return getattr(self, "_execution_device", None) or next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def extra_repr(self) -> str:
        return f"name={self.name!r}, modality={self.modality!r}"
