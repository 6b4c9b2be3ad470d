"""Text encoders of the built-in experts, loaded from local folders (never fetched).

- ``WanTextEncoder``: WAN2.1's UMT5-XXL encoder + tokenizer from a diffusers pipeline folder
  (``text_encoder/``, ``tokenizer/``). Exactly ``diffusers.WanPipeline._get_t5_prompt_embeds``: prompts
  cleaned, padded to ``max_length`` (512), last hidden states zeroed beyond each prompt's real length.
- ``AceStepV1TextEncoder``: ACE-Step v1's umT5-base encoder (``umt5-base/`` of the checkpoint) ->
  ``text_hidden_states`` + ``text_attention_mask``; ``speaker_embeds`` zeros (no reference voice, as in
  ACE-Step's text-to-music); lyrics through ACE-Step's BPE lyric vocabulary when the folder has it.

Both return tensors padded to a fixed length, so cached clips stack into batches.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
from torch import nn

LYRIC_START, LYRIC_LINE_END = 261, 2  # ACE-Step v1's lyric ids: start of lyrics, end of one line


def _folder_with(path: Path, subfolders: tuple[str, ...], marker: str, what: str) -> Path:
    for sub in subfolders:
        folder = path / sub if sub else path
        if (folder / marker).is_file():
            return folder
    tried = ", ".join(f"'{path / s}/{marker}'" if s else f"'{path}/{marker}'" for s in subfolders)
    raise FileNotFoundError(f"no {what} at '{path}': expected {tried}")


def _tokenizer_folder(path: Path, subfolders: tuple[str, ...]) -> Path:
    for sub in subfolders:
        folder = path / sub if sub else path
        if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "spiece.model")):
            return folder
    raise FileNotFoundError(f"no tokenizer at '{path}': expected tokenizer.json or spiece.model in {[str(path / s) for s in subfolders]}")


def _load_umt5(folder: Path, device, dtype):
    from transformers import UMT5EncoderModel

    return UMT5EncoderModel.from_pretrained(folder, torch_dtype=dtype or torch.float32).to(device or "cpu").eval()


class WanTextEncoder(nn.Module):
    """``(prompts, lyrics=None) -> {"encoder_hidden_states": (B, max_length, 4096)}``."""

    def __init__(self, tokenizer, encoder: nn.Module, max_length: int = 512):
        super().__init__()
        self.tokenizer, self.encoder, self.max_length = tokenizer, encoder, int(max_length)

    @classmethod
    def load(cls, path, max_length: int = 512, device=None, dtype=None) -> "WanTextEncoder":
        from transformers import AutoTokenizer

        path = Path(path)
        encoder = _load_umt5(_folder_with(path, ("text_encoder", ""), "config.json", "UMT5 text encoder"), device, dtype)
        tokenizer = AutoTokenizer.from_pretrained(_tokenizer_folder(path, ("tokenizer", "")))
        return cls(tokenizer, encoder, max_length)

    @torch.no_grad()
    def forward(self, prompts: list[str], lyrics: list[str] | None = None) -> dict:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        tok = self.tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=self.max_length,
                             truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        device = next(self.encoder.parameters()).device
        mask = tok.attention_mask.to(device)  # (B, L)
        h = self.encoder(tok.input_ids.to(device), mask).last_hidden_state  # (B, L, 4096)
        # diffusers keeps each prompt's first seq_len states and pads with exact zeros
        return {"encoder_hidden_states": h * (torch.arange(h.shape[1], device=device) < mask.sum(1, keepdim=True))[..., None]}


class AceLyricTokenizer:
    """ACE-Step v1's lyric tokenizer (``VoiceBpeTokenizer`` over its ``vocab.json``), English-only:

    per line ``[en]`` + lower-cased text with spaces as ``[SPACE]``; ids ``261`` first and ``2`` after
    every line (empty lines too), as ``ACEStepPipeline.tokenize_lyrics``. Not reproduced: per-line
    language detection and the multilingual number/abbreviation expansion (non-English lyrics and
    digits tokenize differently from ACE-Step's).
    """

    def __init__(self, vocab_file):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(vocab_file))

    def __call__(self, lyrics: str) -> list[int]:
        ids = [LYRIC_START]
        for line in lyrics.split("\n"):
            line = re.sub(r"\s+", " ", line.strip().lower())
            if line:
                ids += self.tokenizer.encode(f"[en]{line}".replace(" ", "[SPACE]")).ids
            ids.append(LYRIC_LINE_END)
        return ids


class AceStepV1TextEncoder(nn.Module):
    """``(prompts, lyrics=None) ->`` ACE-Step v1 conditioning, every tensor padded to a fixed length:

    ``text_hidden_states (B, text_len, 768)`` (zeros past each prompt), ``text_attention_mask (B, text_len)``,
    ``speaker_embeds (B, 512)`` zeros, ``lyric_token_ids (B, lyric_len)`` long, ``lyric_mask (B, lyric_len)``.
    No lyrics (or no lyric vocabulary) -> ids and mask all zero, which is ACE-Step's own "no lyrics";
    with ``empty_lyric_tokens=n`` the first n ids stay 0 but are attended (mask 1): UniVerse-1's
    "no speech" (32 tokens). Lyrics longer than ``lyric_len`` are cut (UniVerse-1 keeps 128).
    """

    def __init__(self, tokenizer, encoder: nn.Module, lyric_tokenizer: AceLyricTokenizer | None = None,
                 text_len: int = 256, lyric_len: int = 512, speaker_dim: int = 512, empty_lyric_tokens: int = 0):
        super().__init__()
        self.tokenizer, self.encoder, self.lyric_tokenizer = tokenizer, encoder, lyric_tokenizer
        self.text_len, self.lyric_len, self.speaker_dim = int(text_len), int(lyric_len), int(speaker_dim)
        self.empty_lyric_tokens = int(empty_lyric_tokens)

    @classmethod
    def load(cls, path, device=None, dtype=None, **kw) -> "AceStepV1TextEncoder":
        from transformers import AutoTokenizer

        path = Path(path)
        folder = _folder_with(path, ("umt5-base", ""), "config.json", "umT5-base text encoder")
        tokenizer = AutoTokenizer.from_pretrained(_tokenizer_folder(path, ("umt5-base", "")))
        vocab = next((f for f in (path / "lyric_tokenizer" / "vocab.json", path / "vocab.json") if _is_tokenizers_json(f)), None)
        lyric = AceLyricTokenizer(vocab) if vocab else None
        return cls(tokenizer, _load_umt5(folder, device, dtype), lyric, **kw)

    @torch.no_grad()
    def forward(self, prompts: list[str], lyrics: list[str] | None = None) -> dict:
        device = next(self.encoder.parameters()).device
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.text_len, truncation=True, return_tensors="pt")
        mask = tok.attention_mask.to(device)  # (B, L)
        h = self.encoder(input_ids=tok.input_ids.to(device), attention_mask=mask).last_hidden_state * mask[..., None]  # (B, L, 768)
        b = len(prompts)
        ids = torch.zeros(b, self.lyric_len, dtype=torch.long)
        lyric_mask = torch.zeros(b, self.lyric_len, dtype=torch.long)
        lyric_mask[:, : self.empty_lyric_tokens] = 1  # "no lyrics" as the model was trained to see it
        if lyrics is not None and any(lyrics):
            if self.lyric_tokenizer is None:
                warnings.warn("ace-step text encoder: no lyric vocabulary (vocab.json) in the folder; lyrics are left empty", stacklevel=2)
            else:
                for i, text in enumerate(lyrics):
                    if text:
                        seq = self.lyric_tokenizer(text)[: self.lyric_len]
                        lyric_mask[i] = 0
                        ids[i, : len(seq)], lyric_mask[i, : len(seq)] = torch.tensor(seq), 1
        return {"text_hidden_states": h, "text_attention_mask": mask.long(), "speaker_embeds": h.new_zeros(b, self.speaker_dim),
                "lyric_token_ids": ids.to(device), "lyric_mask": lyric_mask.to(device)}


def _is_tokenizers_json(file: Path) -> bool:
    if not file.is_file():
        return False
    try:
        return "model" in json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
