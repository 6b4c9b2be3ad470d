"""``stitch``: which block pairs talk, in which direction, through which connectors and how they reach
the host (soe/stitch/stitcher.py, soe/stitch/connector.py, soe/stitch/depth.py, soe/stitch/lockstep.py, soe/stitch/attention_kv.py take these dataclasses)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from soe.schema.base import Choice, OptionError, choice, require


class Direction(Choice):
    a_to_b = "a_to_b"
    b_to_a = "b_to_a"
    both = "both"


class Engine(Choice):
    auto = "auto"  # hooks for a plain one-way stitch, else lockstep
    hooks = "hooks"
    lockstep = "lockstep"


class ConnectorMlp(Choice):  # timm.layers: Mlp, GluMlp, SwiGLU
    mlp = "mlp"
    glu = "glu"
    swiglu = "swiglu"


class Activation(Choice):
    silu = "silu"
    gelu = "gelu"
    gelu_tanh = "gelu_tanh"
    relu = "relu"


class ConnectorInit(Choice):
    zero = "zero"  # output layer zeroed: step 0 equals the unstitched experts
    trunc_normal = "trunc_normal"  # small random output weights (tests, ablations)


class Resample(Choice):
    auto = "auto"
    linear = "linear"
    area = "area"


class ConnectorPool(Choice):
    mean = "mean"  # the tokens of a time step averaged (UniVerse-1)
    moments = "moments"  # mean + first moments along the source grid's rows and columns (soe.stitch.align.pool_time_moments)


class DepthMode(Choice):
    none = "none"
    insert_interpolated = "insert_interpolated"  # expand the shallower expert (soe/stitch/depth.py)


class InjectMode(Choice):
    add = "add"  # connector output added to the host block's output
    attention_kv = "attention_kv"  # extra key/value tokens of chosen attention modules (soe/stitch/attention_kv.py)


class KVMode(Choice):
    concat = "concat"  # one softmax over the host's and the injected keys
    parallel = "parallel"  # a separate attention over the injected keys, added before to_out


class Rope(Choice):
    none = "none"
    complex = "complex"
    cat = "cat"


class KVInit(Choice):
    copy = "copy"  # new k/v projections start as copies of copy_from's to_k/to_v
    random = "random"


@dataclass
class ConnectorConfig:
    """How every connector of a stitch is built.

    ``hidden=None`` means ``D_src + D_host`` (UniVerse-1's Linear(Da, Da+Dv)-SiLU-Linear(Da+Dv, Dv)).
    """

    mlp: ConnectorMlp = ConnectorMlp.mlp
    hidden: Optional[int] = None  # null = D_src + D_host
    act: Activation = Activation.silu
    init: ConnectorInit = ConnectorInit.zero
    resample: Resample = Resample.auto
    input_norm: bool = False  # LayerNorm on the pooled source state before the MLP
    pool: ConnectorPool = ConnectorPool.mean  # moments: 3x the MLP's input width, sees where things are in a frame

    def __post_init__(self):
        self.mlp = choice(ConnectorMlp, self.mlp, "mlp")
        self.pool = choice(ConnectorPool, self.pool, "pool")
        self.act = choice(Activation, self.act, "act")
        self.init = choice(ConnectorInit, self.init, "init")
        self.resample = choice(Resample, self.resample, "resample")
        require(self.hidden is None or (isinstance(self.hidden, int) and not isinstance(self.hidden, bool) and self.hidden >= 1),
                "hidden", f"expected a positive integer or null (= D_src + D_host), got {self.hidden!r}")

    def hidden_size(self, src_dim: int, dst_dim: int) -> int:
        return self.hidden if self.hidden is not None else src_dim + dst_dim


@dataclass
class DepthConfig:
    """``mode: insert_interpolated`` expands the shallower expert to the deeper one's depth.

    ``every: k`` inserts a block after every k-th original block (k=4: every fifth expanded block is
    new); ``null`` spreads the inserted blocks evenly.
    """

    mode: DepthMode = DepthMode.none
    every: Optional[int] = None

    def __post_init__(self):
        self.mode = choice(DepthMode, self.mode, "mode")
        require(self.every is None or (isinstance(self.every, int) and not isinstance(self.every, bool) and self.every >= 1),
                "every", f"expected a positive integer or null, got {self.every!r}")


@dataclass
class KVTargetConfig:
    """One attention module of the host block that receives the connector's tokens as keys/values."""

    attention: str  # module path inside the host block, e.g. attn2
    mode: KVMode = KVMode.concat
    window: bool = False  # each host token attends only to the injected tokens of its own time step
    pre_norm: Optional[str] = None  # host block module whose input the injected tokens join
    rope: Rope = Rope.none  # 1-D temporal RoPE on the injected keys
    rope_theta: float = 10000.0
    rope_query: bool = False  # also rotate the host queries by their time step
    init: KVInit = KVInit.copy
    copy_from: Optional[str] = None  # null = `attention`
    cfg_mask: bool = True  # the unconditional CFG branch zeroes these tokens

    def __post_init__(self):
        self.mode = choice(KVMode, self.mode, "mode")
        self.rope = choice(Rope, self.rope, "rope")
        self.init = choice(KVInit, self.init, "init")


@dataclass
class InjectConfig:
    """How one direction's connector reaches the host: ``add`` to the block output or ``attention_kv``."""

    mode: InjectMode = InjectMode.add
    tap: Optional[str] = None  # a tap point the source plugin declares; null = the block output
    targets: List[KVTargetConfig] = field(default_factory=list)

    def __post_init__(self):
        self.mode = choice(InjectMode, self.mode, "mode")
        require(all(isinstance(t, KVTargetConfig) for t in self.targets) or not self.targets, "targets",
                "expected KVTargetConfig entries (build them with soe.schema.build)")
        if self.mode == InjectMode.attention_kv:
            require(bool(self.targets), "targets", "attention_kv needs at least one target attention")
            joined = {}  # pre_norm -> first target that joins its injected tokens there (one join per module)
            for i, t in enumerate(self.targets):
                if t.pre_norm is not None:
                    require(t.pre_norm not in joined, f"targets.{i}.pre_norm",
                            f"'{t.pre_norm}' already takes the injected tokens of targets.{joined.get(t.pre_norm)}; "
                            "give each target its own pre_norm (or null)")
                    joined[t.pre_norm] = i
        else:
            require(not self.targets, "targets", "only attention_kv takes targets")


@dataclass
class AutoPairsConfig:
    """``pairs: auto`` (soe/stitch/auto_pairs.py): linear CKA of the experts' pooled block outputs on ``clips``
    paired clips of the recipe's data, noised to each flow time of ``sigmas``; the ``connectors`` most similar
    monotone pairs."""

    connectors: Optional[int] = None  # pairs to choose; null = the shallower expert's depth
    clips: int = 8  # paired clips of the recipe's data the experts run on
    sigmas: List[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])  # flow times the clips are noised to

    def __post_init__(self):
        require(self.connectors is None or (isinstance(self.connectors, int) and not isinstance(self.connectors, bool)
                                            and self.connectors >= 1),
                "connectors", f"expected a positive integer or null (= the shallower depth), got {self.connectors!r}")
        require(isinstance(self.clips, int) and not isinstance(self.clips, bool) and self.clips >= 2, "clips",
                f"expected an integer >= 2 (CKA compares clips), got {self.clips!r}")
        require(len(self.sigmas) >= 1 and all(isinstance(x, (int, float)) and 0 <= x < 1 for x in self.sigmas), "sigmas",
                f"expected flow times in [0, 1), got {list(self.sigmas)}")


@dataclass
class StitchConfig:
    pairs: Any = "linear"  # linear | identity | auto | {every: k} | [[i, j], ...]
    direction: Direction = Direction.both
    detach_source: bool = True  # no gradient crosses modalities through a connector (UniVerse-1)
    engine: Engine = Engine.auto
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    depth: DepthConfig = field(default_factory=DepthConfig)
    inject: Dict[str, InjectConfig] = field(default_factory=dict)  # per direction (a_to_b, b_to_a); default add
    auto: AutoPairsConfig = field(default_factory=AutoPairsConfig)  # pairs: auto (chosen from the experts' similarity)

    def __post_init__(self):
        self.direction = choice(Direction, self.direction, "direction")
        self.engine = choice(Engine, self.engine, "engine")
        if self.engine == Engine.hooks and self.direction == Direction.both:
            raise OptionError("engine", "'hooks' runs one-way stitches only; use 'lockstep' or 'auto' with direction 'both'")
        for direction in self.inject:
            require(direction in ("a_to_b", "b_to_a"), f"inject.{direction}", "expected a direction a_to_b or b_to_a")
            require(self.direction in (direction, Direction.both), f"inject.{direction}",
                    f"stitch.direction is {self.direction!r}, so there is no such connector")

