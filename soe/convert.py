"""``soe convert universe1 SRC DST``: the released UniVerse-1 checkpoint as soe tensors.

The release (``UniVerseTransformer3DModel``, Dorniwang/UniVerse-1-code
``fastvideo/models/wan/modeling_universe.py``) holds 30 fused ``blocks.{k}`` with the Wan block's
own names, the ACE-Step block's names prefixed ``mel_``, the connectors ``mel_to_vid`` / ``vid_to_mel``
(``nn.Sequential`` Linear-SiLU-Linear) and the injected key/value projections as the attention
modules' ``add_k_proj`` / ``add_v_proj`` / ``norm_added_k``; top-level Wan and ACE-Step modules keep
their own names. Fused block k pairs Wan block k with virtual audio block k of the expanded stack.

DST receives what ``soe.train.checkpoint.load_trained`` reads: ``expert_a.safetensors`` and
``expert_b.safetensors`` (state of each expert's model), ``connectors.safetensors`` and
``fusion.safetensors`` (inserted audio blocks, new k/v projections).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from soe.depth import insertion_points
from soe.errors import CheckpointError, one_line

WAN_BLOCK = re.compile(r"^(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0|norm_q|norm_k)\.|^(norm2|ffn|scale_shift_table)\b")
# Released but unused by the released forward (mel_attn is linear self-attention with no context).
UNUSED = re.compile(r"^blocks\.\d+\.mel_attn\.(add_k_proj|add_v_proj|add_q_proj|to_add_out|norm_added_[qk])\.")
ACE_TOP = ("timestep_embedder.", "t_block.", "speaker_embedder.", "genre_embedder.", "lyric_embs.", "lyric_encoder.",
           "lyric_proj.", "projectors.", "proj_in.", "final_layer.")
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
        return load_file(src)
    index = src / "diffusion_pytorch_model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["diffusion_pytorch_model.safetensors"]
    state = {}
    for f in files:
        if not (src / f).is_file():
            raise CheckpointError(f"convert: '{src / f}' not found (expected a UniVerse-1 transformer folder)")
        state.update(load_file(src / f))
    return state


def universe1_key_map(keys, num_audio_blocks: int = 24, every: int = 4) -> tuple[dict[str, str], list[str]]:
    """Released key -> soe key (``a.model.*``, ``b.model.*``, ``connectors.*``, ``fusion.*``); plus keys dropped."""
    fused = 1 + max(int(m.group(1)) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k)))
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


def convert_universe1(src, dst, num_audio_blocks: int = 24, every: int = 4) -> dict[str, int]:
    """Write DST (see module doc); returns tensor counts per file and the number dropped."""
    state = read_state(src)
    mapping, dropped = universe1_key_map(list(state), num_audio_blocks, every)
    groups = {"expert_a": {}, "expert_b": {}, "connectors": {}, "fusion": {}}
    for old, new in mapping.items():
        prefix, rest = new.split(".", 1)
        if prefix == "a":
            groups["expert_a"][rest.removeprefix("model.")] = state[old]
        elif prefix == "b":
            groups["expert_b"][rest.removeprefix("model.")] = state[old]
        else:
            groups[prefix][rest] = state[old]
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name, tensors in groups.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, dst / f"{name}.safetensors")
    return {**{k: len(v) for k, v in groups.items()}, "dropped": len(dropped)}
