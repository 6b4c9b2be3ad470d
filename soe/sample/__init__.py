"""Sampling: from a trained stitch to audio-video clips.

``sampler`` integrates both modalities on one timestep grid with diffusers' schedulers and per-modality CFG;
``generate`` is ``soe generate`` (prompts, codecs, mp4 and contact sheets in a new output folder);
``given_media`` encodes an image, video or audio file as given latents; ``speed`` and ``step_cache`` are the
memory and speed switches (group offloading, fp8 storage, compile, attention backend, first-block step cache);
``callbacks`` samples and reports sync during training; ``parallel`` runs one sample on several ranks under torchrun
(``parallel.context``, ``parallel.cfg``). May import :mod:`soe.train` (to load what trained),
:mod:`soe.evaluate`, :mod:`soe.data`, :mod:`soe.recipe` and everything below them.
"""
