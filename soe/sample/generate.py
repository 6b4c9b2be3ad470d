"""``soe generate``: a stitched model (recipe + trained run) -> mp4 with sound + PNG contact sheet.

Conditioning comes, in this order, from precomputed embeddings (``sample.conditions``: a
safetensors file with ``a/<key>`` and ``b/<key>`` tensors, batch axis first), from each expert's
own text encoder (``experts.<side>.text_encoder_path``), or, for experts built from random weights
(tiny presets, the demo), from a deterministic pseudo-embedding of the prompt.

CFG's null branch: experts whose family encodes a negative prompt (``null_condition:
negative_prompt``, Wan) get ``sample.negative_prompt`` (default "") through their own text encoder,
or ``<side>/negative/<key>`` tensors of the conditions file; the others zero their text conditioning.
"""
from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from safetensors.torch import load_file, save_file

from soe.errors import RecipeError, one_line
from soe.media import contact_sheet, media_sides, write_mp4
from soe.recipe.builders import build_codec, build_sampler, build_text_encoder
from soe.rng import generator_for, stream_seed
from soe.sample.sampler import sample_stitched


def prompt_conditions(stitcher, cfg, prompt: str, n: int, seconds: float) -> dict:
    """Pseudo text conditioning: each expert's conditioning drawn from a generator seeded by the prompt."""
    out = {}
    for side in ("a", "b"):
        e = getattr(stitcher, side)
        if cfg.experts[side].path is not None and cfg.data.kind != "synthetic":  # synthetic-task experts learnt these
            raise RecipeError(f"sample.conditions: expert {side} ('{e.name}') has real weights; give precomputed "
                              "conditioning (sample.conditions=FILE.safetensors with a/<key> and b/<key> tensors)")
        g = generator_for(stream_seed(cfg.sample.seed, "prompt", prompt), side)
        out[side] = e.conditioning(n, seconds, generator=g)
    return out


def text_conditions(stitcher, cfg, prompt: str, n: int, negative_prompt: str | None = None) -> tuple[dict, dict]:
    """Each expert's own text encoder, loaded from ``experts.<side>.text_encoder_path``: the prompt's
    conditioning per side, and the negative prompt's for the sides whose null branch uses one."""
    out, negative = {}, {}
    for side in ("a", "b"):
        e = getattr(stitcher, side)
        encode = build_text_encoder(cfg, side, e, device=e.device)
        out[side] = {k: v.to(e.device) for k, v in encode([prompt] * n).items()}
        if negative_prompt is not None and e.null_condition == "negative_prompt":
            negative[side] = {k: v.to(e.device) for k, v in encode([negative_prompt]).items()}
    return out, negative


def file_conditions(stitcher, path, n: int) -> tuple[dict, dict]:
    """``a/<key>``, ``b/<key>`` tensors (and optionally ``<side>/negative/<key>``, the encoded negative prompt)."""
    try:
        tensors = load_file(path)
    except Exception as err:  # a text file, a folder, a truncated file: safetensors' own error types vary
        raise RecipeError(f"sample.conditions: '{path}' is not a safetensors file of a/<key> and b/<key> "
                          f"tensors ({one_line(err, 120)})") from None
    out, negative = {"a": {}, "b": {}}, {}
    for k, v in tensors.items():
        side, _, key = k.partition("/")
        if side not in out or not key:
            raise RecipeError(f"sample.conditions: tensor '{k}' in '{path}' is not named 'a/<key>' or 'b/<key>'")
        if key.startswith("negative/"):
            e = getattr(stitcher, side)
            negative.setdefault(side, {})[key.removeprefix("negative/")] = v.to(e.device, e.dtype if v.is_floating_point() else v.dtype)
            continue
        out[side][key] = v if v.shape[0] == n else v[:1].expand(n, *v.shape[1:])
    for side in ("a", "b"):
        e = getattr(stitcher, side)
        missing = [k for k in e.condition_keys if k not in out[side]]
        if missing:
            raise RecipeError(f"sample.conditions: '{path}' lacks {side}/{missing[0]} needed by expert '{e.name}'")
        out[side] = {k: v.to(e.device, e.dtype if v.is_floating_point() else v.dtype) for k, v in out[side].items()}
    return out, negative


def stitch_media_sides(stitcher) -> tuple[str, str]:
    return media_sides({side: getattr(stitcher, side) for side in ("a", "b")}, "generate: an mp4 with sound")


def sheet_title(prompt: str, step: int | None, checkpoint) -> str:
    """What a contact sheet shows: the prompt, the training step and where the weights came from."""
    step_text = "untrained connectors" if checkpoint is None else ("step ?" if step is None else f"step {step}")
    where = "no checkpoint" if checkpoint is None else str(checkpoint)
    return f'"{prompt}"  ·  {step_text}  ·  {where}'


@torch.no_grad()
def render_samples(stitcher, cfg, out_dir, codecs: dict | None = None, seed_offset: int = 0, progress=None,
                   write: bool = True, title: str | None = None, given=None) -> list[Path]:
    """Sample, decode through each expert's codec, write ``sample_NN.mp4`` + ``sample_NN.png`` + latents.

    ``title`` heads each contact sheet (default: the prompt). Under a sharded strategy every rank
    must sample (the forward gathers parameters); only the rank with ``write=True`` writes files."""
    out_dir = Path(out_dir)
    seconds = cfg.sample.seconds or cfg.data.seconds
    n = cfg.sample.num_samples
    prompt = cfg.sample.prompt
    v_side, a_side = stitch_media_sides(stitcher)
    negative = None
    if cfg.sample.conditions is not None:
        conditions, negative = file_conditions(stitcher, cfg.sample.conditions, n)
    elif all(cfg.experts[side].text_encoder_path for side in ("a", "b")):
        conditions, negative = text_conditions(stitcher, cfg, prompt, n, cfg.sample.negative_prompt)
    else:
        conditions = prompt_conditions(stitcher, cfg, prompt, n, seconds)
    codecs = codecs or load_codecs(stitcher, cfg)
    if given is None:
        given = given_inputs(stitcher, cfg, codecs, n, seconds)  # image= | video= | audio= | extend=, or None
    was_training = stitcher.training
    stitcher.eval()
    try:
        latents = sample_stitched(stitcher, conditions, seconds, build_sampler(cfg, seed_offset), progress=progress,
                                  negative=negative, given=given.latents if given else None)
    finally:
        stitcher.train(was_training)
    video = codecs[v_side].decode(latents[v_side].to(_device_of(codecs[v_side])))  # (B, 3, F, H, W)
    audio = codecs[a_side].decode(latents[a_side])  # (B, C, N)
    fps, sr = codecs[v_side].rate, int(codecs[a_side].rate)
    if given is not None:  # the given stretch of each track is the input itself
        from soe.sample.given_media import paste_given_media

        video, audio = paste_given_media(given, video, audio, fps, sr)
    if not write:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(n):
        mp4 = write_mp4(out_dir / f"sample_{i:02d}.mp4", video[i], fps, audio[i], sr)
        png = contact_sheet(out_dir / f"sample_{i:02d}.png", video[i], fps, audio[i], sr,
                            title=f"{title or repr(prompt)}  ·  sample {i}" if n > 1 else title or repr(prompt),
                            given=given.seconds if given else None)
        written += [mp4, png]
    save_file({f"{side}/latents": latents[side].float().cpu().contiguous() for side in latents}, out_dir / "latents.safetensors")
    return written


def check_sampling(stitcher, cfg) -> dict:
    """Everything ``render_samples`` needs, checked without sampling (a training run calls this before
    its first step, so a sampling problem never surfaces after hours of training). Returns the codecs."""
    from soe.extras import require

    stitch_media_sides(stitcher)
    require("matplotlib", "sample: contact sheets (PNG) of the samples")  # before any mp4 is written
    if cfg.sample.conditions is not None:
        file_conditions(stitcher, cfg.sample.conditions, cfg.sample.num_samples)
    elif not all(cfg.experts[side].text_encoder_path for side in ("a", "b")):
        prompt_conditions(stitcher, cfg, cfg.sample.prompt, 1, cfg.sample.seconds or cfg.data.seconds)  # same rule as sampling
    return load_codecs(stitcher, cfg)


def given_inputs(stitcher, cfg, codecs: dict, n: int, seconds: float):
    """The recipe's conditioning file encoded by each expert's own codec (soe/sample/given_media.py), or None."""
    from soe.sample.given_media import load_given, requested

    if requested(cfg) is None:
        return None
    if cfg.sample.decode != "codec":  # previews decode only: encode with the experts' codecs
        codecs = {side: build_codec(cfg, side, getattr(stitcher, side), getattr(stitcher, side).device) for side in ("a", "b")}
    return load_given(stitcher, cfg, codecs, n, seconds)


def _device_of(module) -> torch.device:
    return next(iter(module.parameters()), torch.empty(0)).device


def load_codecs(stitcher, cfg) -> dict:
    codecs = {}
    for side in ("a", "b"):
        e = getattr(stitcher, side)
        if uses_synthetic_preview(cfg):  # the synthetic task's own readout (demo)
            from soe.data.synthetic import SyntheticPreviewCodec

            codecs[side] = SyntheticPreviewCodec(e)
            continue
        codecs[side] = build_codec(cfg, side, e, e.device)
    return codecs


def uses_synthetic_preview(cfg) -> bool:
    """``sample.decode: synthetic_preview`` means something only for synthetic-task latents: a model
    trained on a latent cache of real clips (``data.kind: latents``) decodes through its codecs."""
    return cfg.sample.decode == "synthetic_preview" and cfg.data.kind == "synthetic"


def run_folder_of(ckpt) -> Path:
    """The ``soe stitch`` run a ``sample.ckpt`` belongs to (the folder itself, or the parent of ``trained/``)."""
    folder = Path(ckpt)
    return folder.parent if folder.name == "trained" else folder


def output_place(cfg) -> Path:
    """The folder ``soe generate`` writes in (``sample.out``) or under (``<run>/generated``, ``outputs/``),
    checked before anything is built: a writable folder, outside the trained folder it reads, without
    earlier samples (nothing is overwritten)."""
    from soe.outputs import check_output

    if cfg.sample.out is not None:
        out = Path(cfg.sample.out)
        if out.exists() and not out.is_dir():
            raise RecipeError(f"sample.out: '{out}' is a file, expected a folder")
        if out.is_dir() and any(out.glob("sample_*")):
            raise RecipeError(f"sample.out: '{out}' already holds samples; choose another folder (nothing is overwritten)")
    else:
        out = run_folder_of(cfg.sample.ckpt) / "generated" if cfg.sample.ckpt is not None else Path("outputs") / f"{cfg.name}-untrained"
    trained = None if cfg.sample.ckpt is None else Path(cfg.sample.ckpt)
    sources = [] if trained is None else [trained / "trained" if (trained / "trained").is_dir() else trained]
    return check_output(out, "sample.out", sources=sources)


def new_output_folder(cfg) -> Path:
    """Where ``soe generate`` writes: ``sample.out`` if given (refused when it already holds samples),
    else a new ``generate-NNN`` folder in the checkpoint's run (``outputs/`` without a checkpoint).
    Never an existing folder's samples: nothing is overwritten."""
    place = output_place(cfg)
    if cfg.sample.out is not None:
        place.mkdir(parents=True, exist_ok=True)
        return place
    parent = place
    parent.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name.split("-")[-1]) for p in parent.glob("generate-*") if p.name.split("-")[-1].isdigit()]
    n = max(taken, default=0) + 1
    while True:  # mkdir without exist_ok: two generate commands at once still get two folders
        try:
            out = parent / f"generate-{n:03d}"
            out.mkdir()
            return out
        except FileExistsError:
            n += 1


def trained_folder(cfg) -> Path:
    """``sample.ckpt`` (a run folder or its trained/) as the folder to load, checked against the recipe's train modes:
    a LoRA expert needs its adapter (else it would sample as the base expert), and a fully trained expert needs
    ``train: full`` (else the recipe would describe a model the run did not train)."""
    from soe.train.trained import is_merged

    trained = Path(cfg.sample.ckpt)
    trained = trained / "trained" if (trained / "trained").is_dir() else trained
    for side in ("a", "b"):
        mode = cfg.experts[side].train
        weights = (trained / f"lora_{side}", trained / f"expert_{side}", trained / f"expert_{side}.safetensors")
        if mode == "lora" and not any(p.exists() for p in weights):
            raise RecipeError(f"sample.ckpt: '{trained}' has no lora_{side}/ adapter folder, but experts.{side}.train is "
                              f"'lora' (set experts.{side}.train=frozen to sample the base expert)")
        if mode != "full" and (trained / f"expert_{side}").is_dir() and not is_merged(trained):
            raise RecipeError(f"sample.ckpt: '{trained}' holds a fully trained expert_{side}/ (its run had experts.{side}."
                              f"train=full), but experts.{side}.train is '{mode}'; sample it with experts.{side}.train=full")
    return trained


def load_run(cfg):
    """The recipe's stitched model with the trained run of ``sample.ckpt`` loaded: ``(stitcher, step, trained folder)``
    (``soe generate``, and ``soe app`` once per model)."""
    from soe.recipe.builders import build_stitcher
    from soe.train.trained import load_trained, resolve_merged_ckpt

    resolve_merged_ckpt(cfg)  # a merged export: its experts, no LoRA
    trained = trained_folder(cfg) if cfg.sample.ckpt is not None else None  # checked before any model is built
    torch.manual_seed(cfg.seed)
    from soe.data.auto_pairs import find_record, recorded_pair_chooser

    auto = cfg.stitch.pairs == "auto"  # the pairs the run recorded (auto_pairs.json), else chosen as training chose
    stitcher = build_stitcher(cfg, auto_pairs=recorded_pair_chooser(cfg, find_record(trained)) if auto else None)
    step = None
    if trained is not None:
        try:
            step = load_trained(stitcher, trained)
        except FileNotFoundError as err:
            raise RecipeError(f"sample.ckpt: {err}") from None
    return stitcher, step, trained


def generate(cfg, console: Console | None = None, err_console: Console | None = None) -> list[Path]:
    """Build the recipe's stitched model, load the trained run, render the samples into a new folder."""
    from soe.recipe.builders import build_sample
    from soe.sample.parallel import check_ranks, split_for_sampling, start_ranks
    from soe.sample.speed import apply_speed

    console = console or Console()
    err_console = err_console or Console(stderr=True)
    parallel = check_ranks(cfg)  # under torchrun: parallel.context / parallel.cfg against the processes started
    if parallel is not None and cfg.sample.prompts is not None:
        raise RecipeError("sample.prompts: one sample per row is rendered by one process; run it without parallel.context/cfg")
    ranks = start_ranks(parallel, "cuda" if str(cfg.sample.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
                        else "cpu") if parallel is not None else None
    writer = ranks is None or ranks.writer  # rank 0 alone checks and writes the output folder and prints
    if not writer:
        import io

        console = err_console = Console(file=io.StringIO())
    place = output_place(cfg) if writer else None  # where the samples go can be written: checked before any model is built
    stitcher, step, trained = load_run(cfg)
    if trained is not None:
        console.print(f"loaded [bold]{trained}[/] ({'step ' + str(step) if step is not None else 'step not recorded'})", highlight=False)
    rows = None
    if cfg.sample.prompts is not None:  # checked before any model work or folder
        from soe.sample.prompt_rows import read_rows

        rows = read_rows(cfg.sample.prompts)
        if cfg.sample.num_samples != 1:
            raise RecipeError(f"sample.num_samples: prompts= gives one sample per row; expected 1, got {cfg.sample.num_samples}")
    speed = apply_speed(stitcher, build_sample(cfg), cfg.sample.device)  # sample.memory, storage_dtype, cache, ...
    if ranks is not None:
        split_for_sampling(stitcher, ranks)  # the long expert's tokens (context), the guided halves (cfg)
    codecs = speed.prepare_codecs(check_sampling(stitcher, cfg))  # bad conditioning fails here, before any folder is made
    given = given_inputs(stitcher, cfg, codecs, cfg.sample.num_samples, cfg.sample.seconds or cfg.data.seconds)
    if cfg.sample.ckpt is None:
        err_console.print("[bold yellow]warning: no ckpt= given: sampling UNTRAINED connectors[/] (the experts as if never "
                          "stitched); pass ckpt=RUN_DIR of a `soe stitch` run", highlight=False)
    if cfg.sample.decode == "synthetic_preview" and not uses_synthetic_preview(cfg):
        err_console.print("note: sample.decode=synthetic_preview applies to synthetic data only; decoding through the experts' codecs")
    from soe.outputs import removed_on_failure

    if not writer:  # the other ranks sample with rank 0 and write nothing
        render_samples(stitcher, cfg, Path("."), codecs=codecs, given=given, write=False)
        return []
    with removed_on_failure(place, "sample.out"):  # a failure leaves no folder or file it made (a half-written sample)
        out = new_output_folder(cfg)
        if rows is not None:
            return _generate_rows(stitcher, cfg, rows, out, codecs, step, trained, console)
        with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:  # piped: no blank line
            task = bar.add_task("sampling", total=cfg.sample.steps)
            files = render_samples(stitcher, cfg, out, codecs=codecs, given=given,
                                   progress=lambda i, total: bar.update(task, completed=i),
                                   title=sheet_title(cfg.sample.prompt, step, trained))
    for f in files:
        console.print(f"wrote [bold]{f}[/]", highlight=False)
    return files


def _generate_rows(stitcher, cfg, rows: list[dict], out: Path, codecs: dict, step, trained, console: Console) -> list[Path]:
    """One sample per prompts row: ``<id>.mp4``, ``<id>.png``, ``<id>.latents.safetensors``, then ``prompts.jsonl``."""
    from soe.sample.prompt_rows import write_rows

    base_image, files = cfg.sample.image, []
    seconds = cfg.sample.seconds or cfg.data.seconds
    with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("rows", total=len(rows))
        for row in rows:
            cfg.sample.prompt, cfg.sample.image = row["prompt"], row.get("image") or base_image
            given = given_inputs(stitcher, cfg, codecs, 1, seconds)
            tmp = out / f".row-{row['id']}"
            render_samples(stitcher, cfg, tmp, codecs=codecs, given=given, title=sheet_title(row["prompt"], step, trained))
            for src, dst in ((tmp / "sample_00.mp4", out / f"{row['id']}.mp4"), (tmp / "sample_00.png", out / f"{row['id']}.png"),
                             (tmp / "latents.safetensors", out / f"{row['id']}.latents.safetensors")):
                src.replace(dst)
                files.append(dst)
            tmp.rmdir()
            bar.advance(task)
    files.append(write_rows(rows, out))
    for f in files:
        console.print(f"wrote [bold]{f}[/]", highlight=False)
    return files
