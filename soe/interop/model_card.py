"""The model card ``soe export`` writes (``README.md`` at the top of the export) and ``--push-to-hub REPO``.

The card is huggingface_hub's ``ModelCard`` with its card data (the YAML header the Hub indexes): a
``base_model`` per expert given as a Hub repo id, ``library_name: soe``, tags, and the license the experts'
families declare (``Expert.license``; "other" when they differ, none when unknown). Its text is written here
by hand because it is soe's own: the recipe in short, the block pairs, the training steps and data, how to load
the folder in soe / diffusers / ComfyUI, and the run's before/after sheet (copied in) when the run has one.

The upload is huggingface_hub's: ``create_repo`` then one ``create_commit`` of every file of the export
(:func:`hub_operations` lists them), so a test can see what would be uploaded without a network.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from soe.errors import SoeError, UsageError, one_line
from soe.hub import parse_hub_id

CARD = "README.md"
SHEET = "before_after.png"


def check_repo_id(repo_id: str) -> str:
    """``--push-to-hub`` takes a plain ``org/name`` (checked before anything is written)."""
    ref = parse_hub_id(repo_id)
    if ref is None or ref.revision or ref.subfolder:
        raise UsageError(f"--push-to-hub: expected a Hub repo id 'org/name', got {repo_id!r}")
    return ref.repo_id


def base_models(cfg) -> list[str]:
    """The Hub repos the experts' weights came from (``path`` given as a repo id), in side order."""
    refs = [parse_hub_id(cfg.experts[side].path) for side in ("a", "b")]
    return list(dict.fromkeys(r.repo_id for r in refs if r is not None))


def card_license(cfg) -> str | None:
    from soe.plugin.registry import get_expert

    licenses = {getattr(get_expert(cfg.experts[side].name), "license", None) for side in ("a", "b")}
    if None in licenses:
        return None
    return licenses.pop() if len(licenses) == 1 else "other"


def block_pairs(cfg) -> list[tuple[int, int]] | None:
    """The recipe's block pairs (soe.recipe.validate.block_pairs); None when the experts' depths cannot be read."""
    from soe.recipe.validate import block_pairs as pairs_of

    try:
        return list(pairs_of(cfg))
    except (SoeError, ValueError, TypeError, OSError):
        return None  # the card says so rather than failing an export whose files are already written


def data_summary(cfg, run_dir: Path) -> str:
    d = cfg.data
    if d.kind == "synthetic":
        return f"{d.num_clips} synthetic clips of {d.seconds} s (soe's bouncing-square task)"
    meta = Path(str(d.path)) / "meta.json"
    try:
        windows = sum(b["windows"] for b in json.loads(meta.read_text())["buckets"].values())
        return f"{windows} windows of {d.seconds} s from the latent cache `{d.path}`"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"the latent cache `{d.path}` (windows of {d.seconds} s)"


def _expert_rows(cfg) -> list[str]:
    rows = ["| side | expert | weights | trains |", "|---|---|---|---|"]
    for side in ("a", "b"):
        e = cfg.experts[side]
        weights = f"`{e.path}`" if e.path else f"preset `{e.preset}` (random weights)"
        trains = f"LoRA r={e.lora.r}, alpha={e.lora.alpha}" if e.train == "lora" else str(e.train)
        rows.append(f"| {side} | `{e.name}` | {weights} | {trains} |")
    return rows


def _usage(cfg, fmt: str, index: dict, repo: str) -> list[str]:
    """How to load this folder: soe, diffusers, ComfyUI (what each format serves)."""
    lines = ["## Use it", "", "Download: `hf download " + repo + " --local-dir stitch`", ""]
    if fmt == "merged":
        lines += ["soe (the whole stitch: both experts with their LoRA merged, connectors, fusion modules):", "",
                  "```bash", "soe generate stitch/recipe.yaml ckpt=stitch prompt=\"...\"", "```", "",
                  "```python", "import soe", "stitched = soe.load_stitched(\"stitch\")", "```", ""]
        return lines
    sides = [s for s in ("a", "b") if f"lora_{s}" in json.dumps(index)]
    lines += ["This folder holds the experts' LoRA adapters; the connectors that join the experts are in the run's "
              "`trained/` (or a `--format merged` export).", ""]
    if fmt == "diffusers":
        lines += ["soe (start a run from these adapters):", "", "```bash",
                  "soe stitch RECIPE " + " ".join(f"experts.{s}.lora.init_from={repo}:lora_{s}" for s in sides), "```", "",
                  "diffusers (each expert alone, with its family's pipeline or model):", "", "```python"]
        for s in sides:
            base, name, load = parse_hub_id(cfg.experts[s].path), cfg.experts[s].name, index.get(f"lora_{s}", {}).get("load", "")
            lines.append(f"# experts.{s}: {name}" + (f" (base model {base.repo_id})" if base else ""))
            if "pipe.load_lora_weights" in load:  # a family with a diffusers pipeline LoRA loader (export.py)
                lines += ["from diffusers import DiffusionPipeline",
                          f"pipe = DiffusionPipeline.from_pretrained(\"{base.repo_id if base else 'BASE_MODEL'}\")",
                          f"pipe.load_lora_weights(\"{repo}\", subfolder=\"lora_{s}\")"]
            else:  # no diffusers pipeline loader for this family: the call export.json names, on the downloaded folder
                lines.append(f"# stitch/lora_{s}: {load or 'see export.json'}")
        lines += ["```", ""]
    else:
        files = ", ".join(f"`{f}`" for f in index)
        lines += [f"ComfyUI: copy {files} to `ComfyUI/models/loras/` and load with `LoraLoaderModelOnly`.", "",
                  "soe: `soe stitch RECIPE experts.a.lora.init_from=FILE` reads the ComfyUI naming back.", ""]
    return lines


def model_card(cfg, run_dir: Path, out: Path, fmt: str, repo_id: str | None = None):
    """The ``ModelCard`` of the export at ``out`` (already written) of ``run_dir``; copies the before/after sheet in."""
    from huggingface_hub import ModelCard, ModelCardData

    from soe.train.trained import TRAINED_INFO

    info = run_dir / "trained" / TRAINED_INFO
    step = json.loads(info.read_text()).get("step") if info.is_file() else None
    index = json.loads((out / "export.json").read_text()).get("adapters", {}) if (out / "export.json").is_file() else {}
    names = [cfg.experts[s].name for s in ("a", "b")]
    license_ = card_license(cfg)
    data = ModelCardData(base_model=base_models(cfg) or None, library_name="soe", license=license_,
                         tags=["soe", "stitching-of-experts", "audio-video", *names, *(["lora"] if fmt != "merged" else [])])
    pairs = block_pairs(cfg)
    s = cfg.stitch
    lines = [f"# {cfg.name}: {names[0]} + {names[1]}, stitched with soe", "",
             f"Two pretrained diffusion transformers joined block by block with light connectors by soe "
             f"(Stitching of Experts), exported with `soe export --format {fmt}`.", ""]
    if (run_dir / "samples" / SHEET).is_file():
        shutil.copy(run_dir / "samples" / SHEET, out / SHEET)
        lines += [f"![before (experts alone, step 0) and after stitching]({SHEET})", ""]
    lines += ["## Recipe", "", *_expert_rows(cfg), "",
              f"- stitch: pairs `{s.pairs}`, direction `{s.direction}`, detach_source `{s.detach_source}`, "
              f"connector `{s.connector.mlp}` / `{s.connector.act}`",
              f"- flow: timesteps `{cfg.flow.timesteps}`",
              f"- training: {'step ' + str(step) if step is not None else 'steps not recorded'} "
              f"(trainer.max_steps {cfg.trainer.max_steps}), batch {cfg.data.batch_size}, lr {cfg.optim.lr}",
              f"- data: {data_summary(cfg, run_dir)}", ""]
    if pairs is not None:
        lines += [f"### Block pairs ({len(pairs)})", "", "| pair | block of a | block of b |", "|---|---|---|",
                  *(f"| {n} | {i} | {j} |" for n, (i, j) in enumerate(pairs)), ""]
    else:
        lines += ["### Block pairs", "", f"`{s.pairs}` (not resolved: the experts' depths were not readable at export)", ""]
    lines += _usage(cfg, fmt, index, repo_id or "ORG/NAME")
    if license_ == "other":
        lines += ["## License", "", "The experts' licenses differ; each expert's own license applies to its weights.", ""]
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines))


def hub_operations(folder: Path) -> list:
    """One ``CommitOperationAdd`` per file of the export (what ``--push-to-hub`` uploads)."""
    from huggingface_hub import CommitOperationAdd

    folder = Path(folder)
    return [CommitOperationAdd(path_in_repo=f.relative_to(folder).as_posix(), path_or_fileobj=str(f))
            for f in sorted(folder.rglob("*")) if f.is_file()]


def push_export(folder: Path, repo_id: str, private: bool = False, api=None) -> str:
    """Create ``repo_id`` (if new) and upload every file of ``folder`` in one commit; returns the commit URL."""
    from huggingface_hub import HfApi

    api = api or HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True, private=private)
        info = api.create_commit(repo_id, operations=hub_operations(folder), repo_type="model",
                                 commit_message=f"soe export ({folder.name})")
    except (OSError, ValueError) as err:  # no token, no connection, no write access: the export stays on disk
        raise SoeError(f"--push-to-hub: cannot upload to '{repo_id}' ({one_line(err, 200)}); the export is at '{folder}' "
                       f"(upload it later with `hf upload {repo_id} {folder}`)") from None
    return getattr(info, "commit_url", str(info))
