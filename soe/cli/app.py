"""``soe app RECIPE ckpt=RUN [--host H] [--port P]``: a Gradio app to try a trained stitch in a browser.

A form (prompt, negative prompt, seconds, steps, seed, guidance per expert, optional image / video / audio
conditioning, memory mode) over :class:`soe.sample.session.SampleSession`, which loads the model once and reads
each request as ``soe generate`` reads its command line, so bad input is refused with the same one-line message
(shown as the app's error). The result is the mp4 with sound and its contact sheet; sampling progress streams
(a status line per step, and Gradio's progress bar); requests queue, one generation at a time per process (one GPU).

Runs offline: analytics are off (``GRADIO_ANALYTICS_ENABLED=False``, set before gradio is imported) and the theme
uses system fonts, so the page fetches nothing from a CDN. Needs the ``app`` extra (``pip install 'soe[app]'``).
"""
from __future__ import annotations

import os
import queue
import threading

from soe.errors import SoeError

GUIDANCE_HELP = {"video": "video guidance (CFG)", "audio": "audio guidance (CFG)"}


def _request(prompt, negative, seconds, steps, seed, guidance_a, guidance_b, image, video, audio, memory) -> dict:
    """The form's values as ``sample.*`` keys (empty media fields left out)."""
    req = {"prompt": prompt or "", "negative_prompt": negative or "", "seconds": seconds, "steps": steps, "seed": seed,
           "guidance.a": guidance_a, "guidance.b": guidance_b, "memory": memory}
    req.update({k: v for k, v in (("image", image), ("video", video), ("audio", audio)) if v})
    return {k: (int(v) if k in ("steps", "seed") and isinstance(v, float) and v.is_integer() else v) for k, v in req.items()}


def build_app(session):
    """The Gradio Blocks of ``session`` (a :class:`~soe.sample.session.SampleSession`)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from soe.schema.sample import Memory

    cfg, modes = session.cfg, session.modalities
    s = cfg.sample

    def generate(prompt, negative, seconds, steps, seed, guidance_a, guidance_b, image, video, audio, memory,
                 progress=gr.Progress()):
        request = _request(prompt, negative, seconds, steps, seed, guidance_a, guidance_b, image, video, audio, memory)
        try:
            session.config(request)  # bad input: the CLI's one line, before any work
        except SoeError as e:
            raise gr.Error(str(e), print_exception=False) from None
        events: queue.Queue = queue.Queue()
        result: dict = {}

        def work():
            try:
                result["files"] = session.render(request, progress=lambda i, total: events.put((i, total)))
            except BaseException as e:  # noqa: BLE001 -- reported to the page below
                result["error"] = e
            finally:
                events.put(None)

        threading.Thread(target=work, daemon=True).start()
        while (event := events.get()) is not None:  # stream the sampling steps as they happen
            i, total = event
            progress((i, total), desc="sampling", unit="steps")
            yield f"sampling: step {i}/{total}", None, None
        if "error" in result:
            e = result["error"]
            raise gr.Error(str(e) if isinstance(e, SoeError) else f"{type(e).__name__}: {e}", print_exception=False)
        mp4, png = result["files"]
        yield f"done: {mp4}", str(mp4), str(png)

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    with gr.Blocks(title=f"soe: {cfg.name}") as app:
        gr.Markdown(f"## soe · {cfg.name}: {cfg.experts.a.name} ({modes['a']}) + {cfg.experts.b.name} ({modes['b']})\n"
                    f"checkpoint: `{s.ckpt or 'none (untrained connectors)'}`")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="prompt", value=s.prompt, lines=2, elem_id="prompt")
                negative = gr.Textbox(label="negative prompt", value=s.negative_prompt)
                with gr.Row():
                    seconds = gr.Number(label="seconds", value=s.seconds or cfg.data.seconds)
                    steps = gr.Number(label="steps", value=s.steps, precision=0)
                    seed = gr.Number(label="seed", value=s.seed, precision=0)
                with gr.Row():
                    guidance = [gr.Number(label=f"{GUIDANCE_HELP.get(modes[side], 'guidance')} · expert {side}",
                                          value=float(s.guidance.get(side, 1.0))) for side in ("a", "b")]
                with gr.Accordion("conditioning (optional)", open=False):
                    image = gr.Image(label="reference image (first frame)", type="filepath")
                    video = gr.Video(label="video (video-to-audio)")
                    audio = gr.Audio(label="audio (audio-to-video)", type="filepath")
                memory = gr.Dropdown(label="memory mode", choices=[m.value for m in Memory], value=str(s.memory))
                button = gr.Button("generate", variant="primary", elem_id="generate")
            with gr.Column():
                status = gr.Markdown("ready", elem_id="status")
                out_video = gr.Video(label="video with sound", elem_id="result-video", autoplay=False)
                sheet = gr.Image(label="contact sheet", elem_id="result-sheet", type="filepath")
        button.click(generate, [prompt, negative, seconds, steps, seed, *guidance, image, video, audio, memory],
                     [status, out_video, sheet], api_name="generate", concurrency_limit=1)
    app.soe_theme = theme
    return app


def launch(recipe, overrides, host: str = "127.0.0.1", port: int | None = None, block: bool = True):
    """Load the model's recipe (checked before the server starts), then serve the app; ``block=False`` returns
    ``(app, url)`` with the server running in the background (tests)."""
    from soe.extras import require

    require("gradio", "soe app")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from soe.sample.generate import run_folder_of
    from soe.sample.session import SampleSession

    session = SampleSession(recipe, overrides)
    app = build_app(session)
    app.soe_session = session
    app.queue(default_concurrency_limit=1)  # one generation at a time: one model, one device
    out_root = run_folder_of(session.cfg.sample.ckpt) if session.cfg.sample.ckpt else os.path.abspath("outputs")
    _, url, _ = app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=not block,
                           show_error=True, allowed_paths=[str(out_root), os.getcwd()], theme=app.soe_theme)
    return app, url
