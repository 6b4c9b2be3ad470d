"""The metrics ``soe eval`` knows: name, kind (per clip or per set), the weights folder it needs, what each
clip must carry (a prompt, a reference image, a transcript) and the published definition it follows.

Weights come from local folders only: ``--models DIR`` holds one subfolder per model (``clap/``, ``clip/``,
``dino/``, ``whisper/``), each a transformers ``save_pretrained`` folder, and ``synchformer/`` (av-benchmark's
``synchformer_state_dict.pth``, with an optional ``config.json``); a folder whose ``config.json`` names another
kind of model, or a ``synchformer/`` without its weights file, is refused (one line, exit status 2) before
anything is computed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from soe.errors import SoeError
from soe.evaluate import av_align, desync, frechet


class EvalError(SoeError, ValueError):
    """Bad ``soe eval`` input (folder, metric name, models folder, prompts file): one line, exit status 2."""


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # "clip": one value per clip; "set": one value for the whole set (against --reference)
    model: str | None  # subfolder of --models with its weights (None: needs none)
    needs: str | None  # what a clip's prompt row must give: "text", "image", "transcript" (None: nothing)
    definition: str


# model folder -> the transformers model_type values its config.json may name
MODEL_TYPES = {"clap": ("clap",), "clip": ("clip",), "dino": ("dinov2", "dinov2_with_registers", "dinov3_vit"),
               "whisper": ("whisper",), "synchformer": ("synchformer",)}
SYNCHFORMER_WEIGHTS = "synchformer_state_dict.pth"  # soe.evaluate.synchformer.WEIGHTS (not imported: it pulls in torch)

METRICS = {m.name: m for m in (
    Metric("av_align", "clip", None, None, av_align.DEFINITION),
    Metric("clap_score", "clip", "clap", "text",
           "CLAP score (Verse-Bench): cosine of the CLAP text embedding of the audio prompt (else the prompt) and the "
           "audio embedding of the mono track at 48 kHz, peak-normalised to -1 dBFS and rounded to 16 bits"),
    Metric("clip_score", "clip", "clip", "text",
           "CLIP score (torchmetrics CLIPScore): max(100 cos(text, frame), 0) averaged over 8 evenly spaced frames"),
    Metric("id_consistency", "clip", "dino", "image",
           "ID consistency (Verse-Bench): cosine of DINO features (last hidden state, token -2) of the reference image "
           "and of every frame, averaged over the frames"),
    Metric("wer", "clip", "whisper", "transcript",
           "WER (jiwer) of the Whisper transcription of the 16 kHz mono track against the transcript, both stripped and "
           "lower-cased (Verse-Bench's normalisation; a transcription of punctuation only counts as empty)"),
    Metric("desync", "clip", "synchformer", None, desync.DEFINITION),
    Metric("sync_offset", "clip", "synchformer", None, desync.OFFSET_DEFINITION),
    Metric("fd_audio", "set", "clap", None, "fd_audio: " + frechet.DEFINITION + " of CLAP audio embeddings, generated vs --reference"),
    Metric("fd_video", "set", "dino", None,
           "fd_video: " + frechet.DEFINITION + " of DINO CLS embeddings of 8 evenly spaced frames per clip, generated vs "
           "--reference (frame-level, not FVD)"),
)}


def parse_metrics(names: str | None) -> list[str]:
    """``--metrics a,b`` -> the names, in the catalogue's order; an unknown name is an :class:`EvalError`."""
    if names is None:
        return list(METRICS)
    asked = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in asked if n not in METRICS]
    if unknown or not asked:
        raise EvalError(f"--metrics: unknown metric {unknown[0]!r}; expected names among {', '.join(METRICS)}"
                        if unknown else f"--metrics: expected metric names among {', '.join(METRICS)}")
    return [n for n in METRICS if n in asked]


def check_model_folder(name: str, folder: Path) -> None:
    """A weights folder of the kind ``name`` needs: a ``config.json`` whose ``model_type`` fits, else :class:`EvalError`."""
    config = folder / "config.json"
    if name == "synchformer":
        if not (folder / SYNCHFORMER_WEIGHTS).is_file():
            raise EvalError(f"{folder}: expected {SYNCHFORMER_WEIGHTS} (av-benchmark's Synchformer weights) for 'synchformer'")
        if not config.is_file():
            return
    elif not config.is_file():
        raise EvalError(f"{folder}: expected a transformers model folder for {name!r} (save_pretrained, with config.json)")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (ValueError, OSError) as e:
        raise EvalError(f"{config}: not readable JSON ({' '.join(str(e).split())})") from None
    if model_type not in MODEL_TYPES[name]:
        raise EvalError(f"{folder}: holds a {model_type!r} model; the {name}/ folder expects model_type "
                        f"{' or '.join(repr(t) for t in MODEL_TYPES[name])}")


def model_folders(models: str | None, overrides: dict | None = None) -> dict[str, Path]:
    """``{model: folder}`` of the weights present: ``--models DIR``'s subfolders, then ``overrides`` (recipe keys
    ``eval.models.<name>``), each checked; a missing ``DIR`` or a folder of the wrong kind is an :class:`EvalError`."""
    found: dict[str, Path] = {}
    if models is not None:
        root = Path(models)
        if not root.is_dir():
            raise EvalError(f"--models {models}: no such folder (expected one subfolder per model: {', '.join(f'{m}/' for m in MODEL_TYPES)})")
        found.update({m: root / m for m in MODEL_TYPES if (root / m).is_dir()})
    for m, path in (overrides or {}).items():
        if m not in MODEL_TYPES:
            raise EvalError(f"eval.models.{m}: unknown model; expected {', '.join(MODEL_TYPES)}")
        if path is not None:
            if not Path(path).is_dir():
                raise EvalError(f"eval.models.{m}: {path}: no such folder")
            found[m] = Path(path)
    for m, folder in found.items():
        check_model_folder(m, folder)
    return found
