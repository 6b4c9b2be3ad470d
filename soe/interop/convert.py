"""``soe convert universe1 SRC DST``: the released UniVerse-1 checkpoint as soe tensors.

The release (``UniVerseTransformer3DModel``, Dorniwang/UniVerse-1-code
``fastvideo/models/wan/modeling_universe.py``) holds 30 fused ``blocks.{k}`` with the Wan block's
own names, the ACE-Step block's names prefixed ``mel_``, the connectors ``mel_to_vid`` / ``vid_to_mel``
(``nn.Sequential`` Linear-SiLU-Linear) and the injected key/value projections as the attention
modules' ``add_k_proj`` / ``add_v_proj`` / ``norm_added_k``; top-level Wan and ACE-Step modules keep
their own names. Fused block k pairs Wan block k with virtual audio block k of the expanded stack.

DST receives what ``soe.train.trained.load_trained`` reads: ``expert_a.safetensors`` and
``expert_b.safetensors`` (state of each expert's model), ``connectors.safetensors`` and
``fusion.safetensors`` (inserted audio blocks, new k/v projections), plus ``universe1.json``: the
block counts and both experts' architectures as read from the release (its ``config.json`` and
tensor shapes), i.e. the ``experts.<side>.architecture`` / ``stitch.depth`` a recipe needs to match.

Block counts come from the checkpoint: the fused depth is its number of ``blocks.{k}``; the audio
expert's own depth is ``fused * every / (every + 1)`` for the recipe's ``stitch.depth.every``
(UniVerse-1: 30 fused, every 4 -> 24 ACE-Step blocks and one inserted after each 4th), or given.
Which fused blocks were inserted is not stored in the release (after training an inserted block is
no longer its neighbours' mean), so it follows ``every`` like the recipe.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from soe.errors import CheckpointError, one_line
from soe.hub import resolve
from soe.plugin.weights import load_weights
from soe.stitch.depth import insertion_points

WAN_BLOCK = re.compile(r"^(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0|norm_q|norm_k)\.|^(norm2|ffn|scale_shift_table)\b")
# Released but unused by the released forward (mel_attn is linear self-attention with no context).
UNUSED = re.compile(r"^blocks\.\d+\.mel_attn\.(add_k_proj|add_v_proj|add_q_proj|to_add_out|norm_added_[qk])\.")
ACE_TOP = ("timestep_embedder.", "t_block.", "speaker_embedder.", "genre_embedder.", "lyric_embs.", "lyric_encoder.",
           "lyric_proj.", "projectors.", "proj_in.", "final_layer.")
# the release's transformer files when SRC is a Hub repo id (top level, or under its :subfolder)
RELEASE_FILES = ("config.json", "diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                 "model*.safetensors", "model.safetensors.index.json")
WAN_TOP = ("patch_embedding.", "condition_embedder.", "proj_out.", "scale_shift_table")


def read_state(src) -> dict[str, torch.Tensor]:
    """A diffusers folder (single or sharded safetensors) or one ``.safetensors`` file; anything else is
    a one-line :class:`CheckpointError` naming the file."""
    try:
        return _read_state(Path(src))
    except CheckpointError:
        raise
    except Exception as e:  # missing, empty, truncated or not safetensors: safetensors' error types vary
        raise CheckpointError(f"convert: '{src}' is not a UniVerse-1 transformer folder or .safetensors file "
                              f"({one_line(e, 200)})") from None


def _read_state(src: Path) -> dict[str, torch.Tensor]:
    if src.is_file():
        return load_weights(src)
    if not src.is_dir():
        raise CheckpointError(f"convert: '{src}' not found (expected the released UniVerse-1 transformer folder)")
    try:
        state = load_weights(src)
    except FileNotFoundError as e:
        raise CheckpointError(f"convert: {e} (expected a UniVerse-1 transformer folder)") from None
    if not any(k.startswith("blocks.") and ".mel_" in k for k in state):
        raise CheckpointError(f"convert: '{src}' holds no fused blocks (blocks.N.mel_*): not a UniVerse-1 transformer")
    return state


def fused_depth(keys) -> int:
    return 1 + max(int(m.group(1)) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k)))


def audio_depth(fused: int, every: int) -> int:
    """The audio expert's own depth n with ``n + n // every == fused`` (one block inserted per ``every``)."""
    for n in range(fused, 0, -1):
        if n + n // every == fused:
            return n
    raise CheckpointError(f"convert: {fused} fused blocks cannot come from inserting one block after every {every}; "
                          "pass --audio-blocks N")


def release_architectures(state: dict, config: dict, num_audio_blocks: int) -> dict:
    """``experts.{a,b}.architecture`` of the two experts inside the release: from ``config.json``
    (UniVerseTransformer3DModel's arguments) and, where the config does not say, tensor shapes."""
    d = config.get("attention_head_dim", 128)
    wan = {k: config[k] for k in ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
                                  "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps") if k in config}
    wan["num_layers"] = fused_depth(state)
    if "patch_size" in config:
        wan["patch_size"] = list(config["patch_size"])
    heads = config.get("mel_num_attention_heads", 20)
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"lyric_encoder\.encoders\.(\d+)\.", k))})
    ace = {
        "num_layers": num_audio_blocks, "num_attention_heads": heads, "attention_head_dim": d, "inner_dim": heads * d,
        "in_channels": config.get("mel_in_channels", 8), "out_channels": config.get("mel_out_channels", 8),
        "mlp_ratio": config.get("mlp_ratio", 2.5), "rope_theta": config.get("rope_theta", 1e6),
        "max_position": config.get("max_position", 32768), "patch_size": list(config.get("mel_patch_size", (16, 1))),
        "max_height": config.get("max_height", 16),
        "speaker_embedding_dim": int(state["speaker_embedder.weight"].shape[1]),
        "text_embedding_dim": int(state["genre_embedder.weight"].shape[1]),
        "lyric_encoder_vocab_size": int(state["lyric_embs.weight"].shape[0]),
        "lyric_hidden_size": int(state["lyric_embs.weight"].shape[1]),
        "lyric_encoder_layers": len(layers),
        "lyric_encoder_heads": int(state["lyric_encoder.encoders.0.self_attn.pos_bias_u"].shape[0]),
        "lyric_encoder_ff_dim": int(state["lyric_encoder.encoders.0.feed_forward.w_1.weight"].shape[0]),
        "ssl_latent_dims": [int(state[f"projectors.{i}.4.weight"].shape[0]) for i in range(len(config.get("ssl_names", [])))
                            if f"projectors.{i}.4.weight" in state],
    }
    for k in ("ssl_encoder_depths", "ssl_names"):
        if k in config:
            ace[k] = list(config[k])
    return {"a": wan, "b": ace}


def universe1_key_map(keys, num_audio_blocks: int | None = None, every: int = 4) -> tuple[dict[str, str], list[str]]:
    """Released key -> soe key (``a.model.*``, ``b.model.*``, ``connectors.*``, ``fusion.*``); plus keys dropped."""
    fused = fused_depth(keys)
    num_audio_blocks = audio_depth(fused, every) if num_audio_blocks is None else num_audio_blocks
    after = insertion_points(num_audio_blocks, fused, every)
    audio = []  # virtual audio block k -> soe prefix (expert block or inserted block)
    for i in range(num_audio_blocks):
        audio.append(f"b.model.transformer_blocks.{i}.")
        if i in after:
            audio.append(f"fusion.inserted.b.{len(audio):02d}.")
    mapping, dropped = {}, []
    for key in keys:
        m = re.match(r"blocks\.(\d+)\.(.*)$", key)
        if m is None:
            if key.startswith(ACE_TOP):
                mapping[key] = "b.model." + key
            elif key.startswith(WAN_TOP):
                mapping[key] = "a.model." + key
            else:
                dropped.append(key)
            continue
        k, rest = int(m.group(1)), m.group(2)
        kv = f"fusion.kv.{{}}.{k:02d}.{{}}."
        if UNUSED.match(key):
            dropped.append(key)
        elif WAN_BLOCK.match(rest):
            mapping[key] = f"a.model.blocks.{k}.{rest}"
        elif n := re.match(r"(attn1|attn2)\.(add_k_proj|add_v_proj|norm_added_k)\.(.*)$", rest):
            part = {"add_k_proj": "k", "add_v_proj": "v", "norm_added_k": "norm_k"}[n.group(2)]
            mapping[key] = kv.format("b_to_a", n.group(1)) + f"{part}.{n.group(3)}"
        elif n := re.match(r"mel_cross_attn\.(add_k_proj|add_v_proj)\.(.*)$", rest):
            mapping[key] = kv.format("a_to_b", "cross_attn") + f"{'k' if n.group(1) == 'add_k_proj' else 'v'}.{n.group(2)}"
        elif n := re.match(r"(mel_to_vid|vid_to_mel)\.(0|2)\.(.*)$", rest):
            direction = "b_to_a" if n.group(1) == "mel_to_vid" else "a_to_b"
            mapping[key] = f"connectors.{direction}.{k:02d}.mlp.{'fc1' if n.group(2) == '0' else 'fc2'}.{n.group(3)}"
        elif rest.startswith("mel_"):
            name = rest[len("mel_"):]  # mel_attn -> attn, mel_cross_attn -> cross_attn, mel_ff -> ff, ...
            mapping[key] = audio[k] + name
        else:
            dropped.append(key)
    return mapping, dropped


# what DST may hold from an earlier conversion, or from a run (trained/, a run folder): never replaced without --force
EARLIER_RESULTS = ("universe1.json", "expert_a.safetensors", "expert_b.safetensors", "connectors.safetensors",
                   "fusion.safetensors", "stitch.safetensors", "soe_trained.json", "lora_a", "lora_b", "trained", "checkpoints",
                   "recipe.yaml")


def _read_config(config_file: Path) -> dict:
    if not config_file.is_file():
        return {}
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"convert: '{config_file}' is not valid JSON ({one_line(e, 120)})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"convert: '{config_file}' is not a JSON object of the model's arguments")
    return config


def convert_universe1(src, dst, num_audio_blocks: int | None = None, every: int = 4, force: bool = False) -> dict[str, int]:
    """Write DST (see module doc); returns tensor counts per file and the number dropped. SRC may be a Hub
    repo id (``org/name[@revision][:subfolder]``, soe/hub.py): only its top-level config and weights are fetched.
    DST is checked before anything is read (a folder it may write, outside SRC, without earlier results unless
    ``force``), and a failed conversion leaves nothing there."""
    from soe.outputs import check_output, removed_on_failure

    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise CheckpointError(f"convert --every: expected a positive integer (one block inserted after every N), got {every!r}")
    if num_audio_blocks is not None and num_audio_blocks < 1:
        raise CheckpointError(f"convert --audio-blocks: expected a positive integer, got {num_audio_blocks}")
    src = resolve(src, "convert SRC", RELEASE_FILES)
    check_output(dst, "convert DST", sources=[src], results=EARLIER_RESULTS, replace=force)
    with removed_on_failure(dst, "convert DST"):
        return _convert(src, Path(dst), num_audio_blocks, every)


def _convert(src, dst: Path, num_audio_blocks: int | None, every: int) -> dict[str, int]:
    state = read_state(src)
    src = Path(src)
    config = _read_config((src if src.is_dir() else src.parent) / "config.json")
    config_file = (src if src.is_dir() else src.parent) / "config.json"
    fused = fused_depth(state)
    if config.get("num_layers", fused) != fused:
        raise CheckpointError(f"convert: '{config_file}' says num_layers={config['num_layers']} but the weights hold {fused} blocks")
    n_audio = audio_depth(fused, every) if num_audio_blocks is None else num_audio_blocks
    if not 0 < n_audio <= fused:
        raise CheckpointError(f"convert: --audio-blocks {n_audio} must be between 1 and the {fused} fused blocks")
    try:
        inserted_after = insertion_points(n_audio, fused, every)
    except ValueError as err:
        raise CheckpointError(f"convert: {err}") from None
    mapping, dropped = universe1_key_map(list(state), n_audio, every)
    groups = {"expert_a": {}, "expert_b": {}, "connectors": {}, "fusion": {}}
    for old, new in mapping.items():
        prefix, rest = new.split(".", 1)
        if prefix == "a":
            groups["expert_a"][rest.removeprefix("model.")] = state[old]
        elif prefix == "b":
            groups["expert_b"][rest.removeprefix("model.")] = state[old]
        else:
            groups[prefix][rest] = state[old]
    try:
        architecture = release_architectures(state, config, n_audio)
    except (KeyError, IndexError) as e:  # a release missing top-level tensors
        raise CheckpointError(f"convert: '{src}' lacks tensor {one_line(e, 120)} of the UniVerse-1 release (an incomplete "
                              "or partial checkpoint)") from None
    meta = {"fused_blocks": fused, "audio_blocks": n_audio, "every": every, "inserted_after": inserted_after,
            "architecture": architecture, "dropped": sorted(dropped)}
    dst.mkdir(parents=True, exist_ok=True)
    for name, tensors in groups.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, dst / f"{name}.safetensors")
    (dst / "universe1.json").write_text(json.dumps(meta, indent=1) + "\n")
    return {**{k: len(v) for k, v in groups.items()}, "dropped": len(dropped), "audio_blocks": n_audio, "fused_blocks": fused}
