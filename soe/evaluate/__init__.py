"""Evaluation: how good a stitch is. ``metrics`` and ``sync_eval`` measure sync and Frechet distances in latent
space on held-out synthetic clips (the demo's before/after numbers); ``soe eval`` judges decoded media with the
metrics the field reports: ``decode`` (each clip decoded once), ``av_align``, ``clap``, ``clip_score``, ``dino``,
``wer``, ``frechet``, gathered by ``catalog`` (names, weights folders, definitions) and ``run`` (the command's
work, eval.json), shown by ``report``. May import :mod:`soe.data` and everything below it, never training or
sampling.
"""
