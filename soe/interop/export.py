"""``soe export RUN_DIR --format diffusers|comfyui|merged``: a trained run in formats others load.

* ``diffusers``: per LoRA-trained expert, the adapter written by diffusers' own savers with its
  config (rank, alpha, targets) in the safetensors header, loadable with the family's standard call:
  Wan / ACE-Step 1.5 through the pipeline mixin's ``save_lora_weights`` (``transformer.`` keys;
  ``pipe.load_lora_weights(dir)`` or ``transformer.load_lora_adapter(dir)``); ACE-Step v1 as its own
  trainer writes it (``pytorch_lora_weights.safetensors``, bare keys; its pipeline loads the file
  with ``prefix=None`` and no header metadata, so ``alpha / rank`` is folded into ``lora_B``); families without a diffusers LoRA loader (Stable Audio) in peft's format
  (``PeftModel.from_pretrained(transformer, dir)``).
* ``comfyui``: ``diffusion_model.<original module name>.lora_down/lora_up.weight`` + ``.alpha``.
* ``merged``: each expert with its LoRA merged (peft's ``merge``) in the family's official format,
  ``stitch.safetensors`` (connectors, inserted blocks, k/v projections) and the resolved recipe.
  ``soe generate RECIPE ckpt=FOLDER`` and :func:`load_stitched` load it with no LoRA machinery.

Every format gets a model card (``README.md``: Hub metadata, recipe, block pairs, usage; soe/interop/model_card.py),
so the folder can be pushed to the Hub as is (``--push-to-hub REPO``).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from soe.errors import CheckpointError, RecipeError, UsageError
from soe.outputs import check_output, removed_on_failure
from soe.lora.formats import (COMFYUI_NAMES, DIFFUSERS_FILE, PEFT_FILE, LoraFileError, LoraWeights, comfyui_state_dict,
                              read_lora)
from soe.schema import TrainMode
from soe.train.trained import STITCH_FILE, is_merged, load_stitch_file, use_merged_experts

FORMATS = ("diffusers", "comfyui", "merged")
# diffusers pipeline mixins whose save_lora_weights / load_lora_weights serve an expert family
DIFFUSERS_LORA_MIXINS = {"wan2.1": "WanLoraLoaderMixin", "wan2.2-ti2v": "WanLoraLoaderMixin",
                         "ace-step-1.5": "AceStepLoraLoaderMixin"}
BARE_KEY_FAMILIES = ("ace-step",)  # ACE-Step v1's pipeline: load_lora_adapter(file, prefix=None)


def export_run(run_dir, fmt: str, out=None, push_to_hub: str | None = None, private: bool = False) -> Path:
    """Export the run folder of ``soe stitch`` (recipe.yaml + trained/) in ``fmt`` to ``out``, with a model
    card (``README.md``, soe/interop/model_card.py); ``push_to_hub``: then upload it to that Hub repo."""
    from soe.interop.model_card import CARD, check_repo_id, model_card, push_export
    from soe.recipe.reading import load_recipe

    if fmt not in FORMATS:
        raise UsageError(f"--format: expected one of {list(FORMATS)}, got {fmt!r}")
    repo_id = check_repo_id(push_to_hub) if push_to_hub is not None else None
    run_dir = Path(run_dir)
    recipe, trained = run_dir / "recipe.yaml", run_dir / "trained"
    if not recipe.is_file() or not trained.is_dir():
        raise CheckpointError(f"'{run_dir}' is not a run folder of `soe stitch`: expected recipe.yaml and trained/")
    out = Path(out) if out is not None else run_dir / "export" / fmt
    if out.exists() and out.is_dir() and any(out.iterdir()):
        raise UsageError(f"--out: '{out}' already exists and is not an empty folder; choose another")
    check_output(out, "--out", sources=[trained, recipe])  # under a file, read-only, inside trained/: refused now
    cfg = load_recipe(recipe)
    off = {side: list(t) for side, t in (cfg.sample.get("lora_off") or {}).items() if t}
    if fmt == "merged" and off:  # merged experts have no LoRA left to switch off for those tasks
        side = min(off)
        raise UsageError(f"--format merged: the run's sample.lora_off.{side} samples {off[side]} without expert {side}'s "
                         "LoRA, which merging bakes in; use --format diffusers or comfyui (the LoRA stays a separate file)")
    with removed_on_failure(out, "--out"):  # a failed export leaves no folder it made (RUN/export/ included)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # nothing half-written at `out`
        try:
            {"diffusers": export_diffusers, "comfyui": export_comfyui, "merged": export_merged}[fmt](cfg, trained, tmp)
            model_card(cfg, run_dir, tmp, fmt, repo_id).save(tmp / CARD)
            if out.exists():
                out.rmdir()
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if repo_id is not None:
        push_export(out, repo_id, private=private)
    return out


# ---- adapters ------------------------------------------------------------------------------------
def _lora_sides(cfg, trained: Path, fmt: str) -> dict[str, LoraWeights]:
    sides = {}
    for side in ("a", "b"):
        if cfg.experts[side].train != "lora":
            continue
        folder = trained / f"lora_{side}"
        if not folder.is_dir():
            raise CheckpointError(f"'{trained}' has no lora_{side}/ although experts.{side}.train is 'lora'")
        sides[side] = read_lora(folder)
    if not sides:
        raise UsageError(f"--format {fmt}: no expert of this run trained a LoRA (experts.*.train); use --format merged")
    return sides


def _metadata(weights: LoraWeights) -> dict:
    """The adapter config as diffusers stores it in the safetensors header (JSON-ready)."""
    conf = weights.peft_config().to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in conf.items()}


def save_diffusers_lora(weights: LoraWeights, expert_name: str, folder: Path) -> dict:
    """Write one adapter with diffusers' (or, failing a diffusers loader, peft's) saver; returns how to load it."""
    from diffusers.loaders import lora_pipeline
    from diffusers.loaders.lora_base import LoraBaseMixin

    meta = _metadata(weights)
    if expert_name in DIFFUSERS_LORA_MIXINS:
        mixin = getattr(lora_pipeline, DIFFUSERS_LORA_MIXINS[expert_name])
        mixin.save_lora_weights(folder, transformer_lora_layers=weights.tensors, transformer_lora_adapter_metadata=meta)
        return {"file": DIFFUSERS_FILE, "load": f"pipe.load_lora_weights(dir) (diffusers {mixin.__name__}) or "
                                               f"transformer.load_lora_adapter(dir, weight_name='{DIFFUSERS_FILE}')"}
    if expert_name in BARE_KEY_FAMILIES:  # its pipeline ignores the header: carry alpha in the weights
        weights = weights.with_alpha_equal_rank()
        meta = _metadata(weights)
        LoraBaseMixin.write_lora_layers(state_dict=weights.tensors, save_directory=str(folder), is_main_process=True,
                                        weight_name=DIFFUSERS_FILE, save_function=None, safe_serialization=True,
                                        lora_adapter_metadata=meta)
        return {"file": DIFFUSERS_FILE, "load": "transformer.load_lora_adapter(dir/pytorch_lora_weights.safetensors, prefix=None)"}
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    weights.peft_config().save_pretrained(folder)  # peft's adapter_config.json
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in weights.tensors.items()}, folder / PEFT_FILE)
    return {"file": PEFT_FILE, "load": "peft.PeftModel.from_pretrained(transformer, dir)"}


def export_diffusers(cfg, trained: Path, out: Path) -> None:
    index = {}
    for side, weights in _lora_sides(cfg, trained, "diffusers").items():
        name = cfg.experts[side].name
        index[f"lora_{side}"] = {"expert": name, **save_diffusers_lora(weights, name, out / f"lora_{side}")}
    (out / "export.json").write_text(json.dumps({"format": "diffusers", "adapters": index}, indent=1))


def export_comfyui(cfg, trained: Path, out: Path) -> None:
    from safetensors.torch import save_file

    index = {}
    for side, weights in _lora_sides(cfg, trained, "comfyui").items():
        name = cfg.experts[side].name
        if name not in COMFYUI_NAMES:
            raise UsageError(f"--format comfyui: expert '{name}' (experts.{side}) has no ComfyUI naming in soe; "
                             f"supported: {', '.join(sorted(COMFYUI_NAMES))} (use --format diffusers)")
        try:
            tensors = comfyui_state_dict(weights, COMFYUI_NAMES[name])
        except LoraFileError as e:
            raise UsageError(f"--format comfyui: experts.{side}: {e}") from None
        file = f"lora_{side}_{name}.safetensors"
        save_file(tensors, out / file, metadata={"format": "pt"})
        index[file] = {"expert": name, "load": "ComfyUI: models/loras/, LoraLoaderModelOnly"}
    (out / "export.json").write_text(json.dumps({"format": "comfyui", "adapters": index}, indent=1))


# ---- merged --------------------------------------------------------------------------------------
def merge_lora(model: torch.nn.Module) -> int:
    """Fold every peft LoRA layer into its base layer (peft's ``merge``) and put the base layer back,
    so the model has its original modules and state_dict keys. Returns the number of merged layers."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
            merged += 1
    if hasattr(model, "peft_config"):
        del model.peft_config
    return merged


def export_merged(cfg, trained: Path, out: Path) -> None:
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from soe.recipe.builders import build_stitcher
    from soe.train.trained import load_trained

    torch.manual_seed(cfg.seed)  # preset (random-weight) experts come out as in training and `soe generate`
    st = build_stitcher(cfg, auto_pairs=_auto_pairs(cfg, trained))
    load_trained(st, trained)
    for side in ("a", "b"):
        expert = getattr(st, side)
        merge_lora(expert.model)
        expert.save(out / f"expert_{side}")
    stitch = {f"connectors.{k}": v for k, v in st.connectors.state_dict().items()}
    if st.fusion is not None:
        stitch.update({f"fusion.{k}": v for k, v in st.fusion.state_dict().items()})
    save_file({k: v.detach().cpu().contiguous() for k, v in stitch.items()}, out / STITCH_FILE)
    merged = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for side in ("a", "b"):  # the experts of this folder, nothing left to train or to load from elsewhere
        merged.experts[side].path = f"expert_{side}"
        merged.experts[side].train = TrainMode.frozen
    merged.sample.ckpt = None
    if cfg.stitch.pairs == "auto":  # the pairs the connectors were trained at, written out: nothing to choose again
        merged.stitch.pairs = [list(p) for p in st.pairs]
    OmegaConf.save(merged, out / "recipe.yaml")


def load_stitched(folder, device=None):
    """The stitched model of a merged export (``soe export --format merged``), ready to sample:
    plain experts (no LoRA layers) and the trained connectors."""
    from soe.recipe.builders import build_stitcher
    from soe.recipe.reading import load_recipe
    from soe.recipe.validate import validate_recipe

    folder = Path(folder)
    if not is_merged(folder) or not (folder / "recipe.yaml").is_file():
        raise CheckpointError(f"'{folder}' is not a merged export: expected recipe.yaml, {STITCH_FILE}, expert_a/ and expert_b/")
    cfg = load_recipe(folder / "recipe.yaml")
    use_merged_experts(cfg, folder)
    validate_recipe(cfg)
    if cfg.stitch.pairs == "auto":  # merged experts are not the experts training chose the pairs from
        raise RecipeError("stitch.pairs: 'auto' cannot be chosen again from merged experts; write the pairs the run "
                          "chose (`soe inspect` on its recipe) as a list of [i, j]")
    st = build_stitcher(cfg, device=device)
    try:
        load_stitch_file(st, folder / STITCH_FILE)
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"'{folder / STITCH_FILE}': {' '.join(str(e).split())[:300]}") from None
    return st.eval()


def _auto_pairs(cfg, trained=None):
    """``stitch.pairs: auto``: the pairs the run recorded (``auto_pairs.json``), else chosen again as training chose them."""
    if cfg.stitch.pairs != "auto":
        return None
    from soe.data.auto_pairs import find_record, recorded_pair_chooser

    return recorded_pair_chooser(cfg, find_record(trained))
