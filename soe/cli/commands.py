"""The ``soe`` command: ``experts``, ``inspect``, ``stitch``, ``generate``, ``app``, ``eval``, ``encode``, ``annotate``, ``convert``, ``export``.

Start-up stays fast: this module imports only argparse, rich and ``soe.errors``; each subcommand
imports what it needs (torch, diffusers, Lightning) when it runs.

Bad input (recipe keys, paths, names, checkpoint folders, latent caches, arguments) prints one line
naming the problem and exits with status 2; a run stopped by a non-finite loss
(``trainer.on_nonfinite: stop``) prints one line naming the modality and step and exits with status 1; Ctrl-C
prints one line (for training: the checkpoint a resume uses and the command) and exits with status 130
(training stopped by SIGTERM or SIGUSR1: 128 + its number).
"""
from __future__ import annotations

import argparse
import sys

from rich.markup import escape

from soe.console import make_console
from soe.errors import SoeError, TrainingInterrupted, UsageError

console = make_console()
err_console = make_console(stderr=True)


def _cmd_experts(args) -> int:
    from soe.cli import cache as cli_cache

    key = None if args.details or args.no_cache else cli_cache.experts_key()
    tables = cli_cache.load(key)  # a repeated listing imports no torch (soe/cli/cache.py)
    if tables is None:
        from soe.cli.tables import experts_table

        if args.details:  # built on meta: the classes themselves
            from soe.plugin.registry import get_expert, list_experts

            rows = [get_expert(n) for n in list_experts()]
        else:  # the plugins' torch-free descriptions where they declare one (soe/plugin/listing.py)
            from soe.plugin.listing import listings

            rows = listings()
        tables = [experts_table(rows, details=args.details)]
        cli_cache.save(key, tables)
    print_tables(tables)
    return 0


def _cmd_experts_check(args) -> int:
    from soe.testing import check_expert, resolve_expert, results_table

    cls = resolve_expert(args.expert)  # ExpertSpecError (a SoeError): one line, exit status 2
    results = check_expert(cls, checks=args.check, partner=args.partner)
    failed = sum(not r.passed for r in results)
    console.print(results_table(results, title=f"expert contract: {cls.name} ({cls.__module__}.{cls.__qualname__})"))
    console.print(f"{len(results) - failed}/{len(results)} properties hold" + (f", [bold red]{failed} failed[/]" if failed else ""))
    return 1 if failed else 0


def _cmd_inspect(args) -> int:
    from soe.cli import cache as cli_cache
    from soe.recipe.reading import load_recipe

    cfg = load_recipe(args.recipe, args.overrides)
    if cfg.stitch.pairs == "auto":  # the experts run on the recipe's clips: loaded, never cached
        from pathlib import Path

        from soe.cli.tables import recipe_tables, similarity_table
        from soe.data.auto_pairs import choose_for_recipe, write_heatmap
        from soe.outputs import check_output
        from soe.recipe.validate import validate_recipe

        validate_recipe(cfg)  # bad keys and paths: one line, before any expert runs
        png = Path(args.heatmap or Path(cfg.run_dir) / "auto_pairs.png")
        if png.suffix.lower() != ".png" or png.is_dir():
            raise UsageError(f"--heatmap {png}: expected a .png file")
        check_output(png.parent, "--heatmap")  # not under a file, writable: before the experts run
        record = choose_for_recipe(cfg)
        print_tables([*recipe_tables(cfg, pairs=record["pairs"]), similarity_table(record)])
        png = write_heatmap(record, png)
        console.print(f"chose pairs {[list(p) for p in record['pairs']]}; heat map [bold]{escape(str(png))}[/]", highlight=False)
        return 0
    if args.heatmap is not None:
        raise UsageError("--heatmap: only stitch.pairs: auto measures the block similarity it draws (this recipe gives "
                         "its pairs)")
    key = None if args.no_cache else cli_cache.recipe_key(cfg)
    tables = cli_cache.load(key)  # the same recipe, soe and libraries as last time: no torch import
    if tables is None:
        from soe.cli.tables import recipe_tables

        tables = recipe_tables(cfg)  # validated, built on the meta device: full-size recipes in seconds
        cli_cache.save(key, tables)
    print_tables(tables)
    return 0


def print_tables(tables) -> None:
    for t in tables:
        console.print(t)


def _cmd_stitch(args) -> int:
    from soe.cli.stitch import run_training

    # `--allow-changes KEY...` may swallow trailing key=value overrides: those go back to the overrides
    allowed = [k for k in (args.allow_changes or []) if "=" not in k]
    overrides = [*args.overrides, *(k for k in (args.allow_changes or []) if "=" in k)]
    run_training(args.recipe, overrides, console=console, allow_changes=allowed)
    return 0


SAMPLE_SHORT_KEYS = ("ckpt", "prompt", "prompts", "negative_prompt", "conditions", "seconds", "seed", "steps", "scheduler", "num_samples",
                     "out", "image", "video", "audio", "extend", "extend_seconds")


def _cmd_generate(args) -> int:
    from soe.recipe.reading import load_recipe
    from soe.recipe.validate import validate_recipe
    from soe.sample.generate import generate

    # short forms: `ckpt=RUN prompt="..." seconds=5 seed=0 steps=30 out=DIR image=ref.png` mean sample.<key>;
    # the prompt is taken literally (soe.recipe.reading.LITERAL_KEYS): any text, `prompt=` for an empty one
    overrides = [f"sample.{o}" if o.split("=", 1)[0] in SAMPLE_SHORT_KEYS else o for o in args.overrides]
    cfg = load_recipe(args.recipe, overrides)
    from soe.train.trained import resolve_merged_ckpt

    resolve_merged_ckpt(cfg)  # ckpt=FOLDER of `soe export --format merged`: experts from its folders
    validate_recipe(cfg)
    generate(cfg, console=console, err_console=err_console)
    return 0


def _cmd_app(args) -> int:
    from soe.cli.app import launch

    if args.port is not None and not 0 < args.port < 65536:
        raise UsageError(f"--port: expected a TCP port between 1 and 65535, got {args.port}")
    overrides = [f"sample.{o}" if o.split("=", 1)[0] in SAMPLE_SHORT_KEYS else o for o in args.overrides]
    launch(args.recipe, overrides, host=args.host, port=args.port)
    return 0


def _cmd_eval(args) -> int:
    from rich.markup import escape as esc
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from soe.evaluate.report import eval_table
    from soe.evaluate.run import evaluate, plan, write_json

    if args.workers < 0:
        raise UsageError(f"--workers: expected a number of processes >= 0, got {args.workers}")
    p = plan(args.samples, reference=args.reference, prompts=args.prompts, models=args.models, metrics=args.metrics,
             out=args.out, force=args.force, device=args.device)  # every input checked: nothing is written on bad input
    for name, why in p["skipped"].items():
        err_console.print(f"[yellow]skipped[/] {name}: {esc(why)}", highlight=False, soft_wrap=True)

    def failure(stem, why):
        err_console.print(f"[bold red]failed:[/] {esc(stem)}: {esc(why)}", highlight=False, soft_wrap=True)

    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        result = evaluate(p, workers=args.workers, device=args.device, progress=progress, on_failure=failure)
    out = write_json(result, p["out"])
    console.print(eval_table(result, title=f"soe eval: {len(result['clips'])} clips"))
    console.print(f"wrote [bold]{esc(str(out))}[/]")
    return 1 if result["failed"] else 0


def _cmd_encode(args) -> int:
    from soe.data.encode import encode_command

    encode_command(args.recipe, args.src, args.overrides, out=args.out, workers=args.workers, console=console, shard=args.shard,
                   annotations=args.annotations)
    return 0


def _cmd_annotate(args) -> int:
    from soe.data.annotate_run import annotate_command

    annotate_command(args.recipe, args.src, args.overrides, out=args.out, shard=args.shard, console=console, workers=args.workers,
                     flags={"--asr": args.asr, "--captioner": args.captioner, "--device": args.device, "--cache": args.cache})
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``error: ...``, status 2) instead of usage text."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="soe", description="Stitching of Experts: join two pretrained diffusion transformers.")
    p.add_argument("--version", action=_VersionAction, help="print soe's version and exit")
    sub = p.add_subparsers(dest="command", required=True)
    experts = sub.add_parser("experts", help="list registered experts; `soe experts check X` runs the contract checks")
    experts.add_argument("--details", action="store_true", help="also blocks, width and tokens/s of each real-size preset (builds on meta; slower)")
    experts.add_argument("--no-cache", action="store_true", help="list from the expert classes, not from the start-up cache")
    experts.set_defaults(func=_cmd_experts)
    check = experts.add_subparsers(dest="experts_command").add_parser("check", help="run the expert contract checks (soe.testing)")
    check.add_argument("expert", help="a registered name (wan2.1) or module:Class of a plugin")
    check.add_argument("--partner", default="auto", help="built-in expert for the zero-init stitch check (default: other modality)")
    check.add_argument("--check", action="append", metavar="PROPERTY", help="run only this check (repeatable; default: all)")
    check.set_defaults(func=_cmd_experts_check)
    for name, func, help_ in (("inspect", _cmd_inspect, "show block pairs, connector shapes and parameter counts (meta device)"),
                              ("stitch", _cmd_stitch, "train a stitched model from a recipe"),
                              ("generate", _cmd_generate, "sample audio+video from a stitched model: mp4 + contact sheet")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("recipe", help="recipe YAML file, or the name of a shipped recipe (demo, universe1, ...)")
        sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_steps=10")
        sp.set_defaults(func=func, intermixed=sp)
        if name == "inspect":
            sp.add_argument("--no-cache", action="store_true", help="build on meta even when the start-up cache has these tables")
            sp.add_argument("--heatmap", default=None, metavar="PNG", help="pairs: auto: where the CKA heat map goes "
                            "(default: RUN_DIR/auto_pairs.png)")
        if name == "stitch":
            sp.add_argument("--allow-changes", nargs="+", metavar="KEY", default=[],
                            help="on resume, accept these recipe keys (or sections) differing from the run's recipe.yaml")
    app = sub.add_parser("app", help="a Gradio app to try a trained stitch in the browser (pip install 'soe[app]')")
    app.add_argument("recipe", help="recipe YAML file, or the name of a shipped recipe")
    app.add_argument("overrides", nargs="*", help="ckpt=RUN and other key=value overrides, as for soe generate")
    app.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    app.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free one)")
    app.set_defaults(func=_cmd_app, intermixed=app)
    ev = sub.add_parser("eval", help="judge generated clips on decoded media: AV-Align, CLAP/CLIP scores, ID consistency, WER, FDs")
    ev.add_argument("samples", help="folder of mp4 clips (a `soe generate` output folder) or a run folder (its generated/ clips)")
    ev.add_argument("--reference", default=None, metavar="DIR", help="folder of real clips for the set metrics (fd_audio, fd_video)")
    ev.add_argument("--prompts", default=None, metavar="FILE", help="JSON lines {id, prompt, audio_prompt?, image?, transcript?} "
                    "(default: SAMPLES/prompts.jsonl when present)")
    ev.add_argument("--models", default=None, metavar="DIR", help="local weights: one subfolder per model (clap/, clip/, dino/, whisper/)")
    ev.add_argument("--metrics", default=None, metavar="NAME,...", help="which metrics (default: every metric whose weights are present)")
    ev.add_argument("--workers", type=int, default=0, help="processes decoding clips and computing AV-Align (0: this process)")
    ev.add_argument("--device", default=None, help="device of the models (default: cuda when available, else cpu)")
    ev.add_argument("--out", default=None, metavar="FILE", help="results file (default: SAMPLES/eval.json)")
    ev.add_argument("--force", action="store_true", help="overwrite an existing results file")
    ev.set_defaults(func=_cmd_eval)
    conv = sub.add_parser("convert", help="convert a released checkpoint to soe tensors (load with ckpt=DST)")
    conv.add_argument("model", choices=["universe1"], help="which release")
    conv.add_argument("src", help="the released transformer folder (or one .safetensors file)")
    conv.add_argument("dst", help="output folder: expert_{a,b}, connectors, fusion .safetensors + universe1.json")
    conv.add_argument("--every", type=int, default=4, help="one audio block was inserted after every EVERY (stitch.depth.every)")
    conv.add_argument("--audio-blocks", type=int, default=None,
                      help="the audio expert's own depth (default: read off the checkpoint's fused depth and --every)")
    conv.add_argument("--force", action="store_true", help="replace an earlier conversion (or trained files) in DST")
    conv.set_defaults(func=_cmd_convert)
    enc = sub.add_parser("encode", help="encode a folder of audio-video clips + captions into a latent cache (soe.data)")
    enc.add_argument("recipe", help="recipe YAML file (experts, codec/text encoder folders, data.seconds)")
    enc.add_argument("src", help="folder of video files with sidecar captions (clip.txt or captions.jsonl)")
    enc.add_argument("--out", default=None, help="cache folder (default: data.path of the recipe)")
    enc.add_argument("--workers", type=int, default=0, help="decode processes (0: decode in this process)")
    enc.add_argument("--shard", default=None, metavar="I/N", help="encode part I of N (one process per GPU or node); the last to finish merges")
    enc.add_argument("--annotations", default=None, metavar="FILE",
                     help="annotations.jsonl of soe annotate: each window's own text (default: SRC/annotations.jsonl when present)")
    enc.add_argument("overrides", nargs=argparse.REMAINDER, help="key=value recipe overrides and encode.<key>=value settings")
    enc.set_defaults(func=_cmd_encode)
    ann = sub.add_parser("annotate", help="give each training window of a folder of clips its own caption, sound description and transcript")
    ann.add_argument("recipe", help="recipe YAML file (the experts and data.seconds decide where windows fall, as in soe encode)")
    ann.add_argument("src", help="folder of video files (clip.words.json sidecars or words in captions.jsonl: timed transcripts)")
    ann.add_argument("--out", default=None, metavar="FILE",
                     help="annotations file, one JSON line per window (default: SRC/annotations.jsonl; shard logs in FILE.parts/)")
    ann.add_argument("--asr", default=None, metavar="PATH", help="local Whisper folder: word-timed transcripts, cut at word midpoints")
    ann.add_argument("--captioner", default=None, metavar="PATH",
                     help="local Qwen2.5-Omni folder (caption + sound description, sees and hears) or image-text model (captions)")
    ann.add_argument("--shard", default=None, metavar="I/N", help="annotate part I of N (one process per GPU or node); the last to finish merges")
    ann.add_argument("--workers", type=int, default=0, metavar="N",
                     help="processes probing, hashing and decoding clips ahead of the models (0: one thread of this process)")
    ann.add_argument("--device", default=None, metavar="D", help="device of the models (default: cuda when available, else cpu)")
    ann.add_argument("--cache", default=None, metavar="DIR",
                     help="folder of the models' outputs, shared by every run (default: $SOE_CACHE_DIR/annotate or ~/.cache/soe/annotate)")
    ann.add_argument("overrides", nargs=argparse.REMAINDER, help="key=value recipe overrides and annotate.<key>=value settings")
    ann.set_defaults(func=_cmd_annotate)
    exp = sub.add_parser("export", help="write a trained run in formats others load: diffusers / ComfyUI LoRA, or merged weights")
    exp.add_argument("run_dir", help="run folder of `soe stitch` (with recipe.yaml and trained/)")
    exp.add_argument("--format", required=True, choices=["diffusers", "comfyui", "merged"],
                     help="diffusers: per-expert LoRA for load_lora_adapter / load_lora_weights; comfyui: ComfyUI key "
                          "naming with alpha tensors; merged: experts with LoRA merged + stitch.safetensors + recipe")
    exp.add_argument("--out", default=None, help="output folder (default: RUN_DIR/export/FORMAT); must not exist or be empty")
    exp.add_argument("--push-to-hub", default=None, metavar="REPO", help="then upload the folder (with its model card) to "
                     "this Hub repo (org/name; created if new; needs `hf auth login` or HF_TOKEN)")
    exp.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    exp.set_defaults(func=_cmd_export)
    return p


class _VersionAction(argparse.Action):
    """``--version``, reading the package metadata only when asked (start-up stays lean)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"soe {_version()}")
        parser.exit()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("soe")
    except PackageNotFoundError:
        return "0.0.0+unknown (not installed)"


def _cmd_export(args) -> int:
    from soe.interop.export import export_run

    out = export_run(args.run_dir, args.format, args.out, push_to_hub=args.push_to_hub, private=args.private)
    console.print(f"wrote [bold]{out}[/]" + (f" and uploaded it to https://huggingface.co/{args.push_to_hub}" if args.push_to_hub else ""))
    return 0


def _cmd_convert(args) -> int:
    from soe.interop.convert import convert_universe1

    counts = convert_universe1(args.src, args.dst, num_audio_blocks=args.audio_blocks, every=args.every, force=args.force)
    console.print(f"wrote {args.dst}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def _quiet() -> None:
    """No library chatter on soe's screens (known harmless warnings; Lightning banners once it is imported)."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*torch\.nn\.utils\.weight_norm.* is deprecated", category=FutureWarning)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """argparse, with options allowed after the key=value overrides (``soe inspect R k=v --heatmap x.png``): plain
    argparse stops at the first option after a ``nargs='*'`` positional and calls the rest unrecognised."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not extra:
        return args
    sub = getattr(args, "intermixed", None)
    if sub is None:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return sub.parse_intermixed_args(argv[argv.index(args.command) + 1:], argparse.Namespace(command=args.command))


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_arguments(argv)
        if args.func not in (_cmd_experts, _cmd_inspect):  # listings compute nothing (and may not import torch)
            from soe.threads import configure_threads

            configure_threads()  # before any torch work; a recipe's trainer.threads refines it later
        _quiet()
        return args.func(args)
    except SoeError as e:  # recipes, checkpoints, latent caches, arguments, non-finite losses
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt as e:  # Ctrl-C; training says which checkpoint a resume uses (soe.train.interrupt)
        if str(e) or not isinstance(e, TrainingInterrupted):  # an empty one: a second DDP rank, rank 0 has said it
            err_console.print(f"[bold yellow]interrupted:[/] {escape(str(e) or 'stopped by Ctrl-C')}", highlight=False, soft_wrap=True)
        return getattr(e, "exit_code", TrainingInterrupted.exit_code)


if __name__ == "__main__":
    sys.exit(main())
