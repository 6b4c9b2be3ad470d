"""Everything about data: from a folder of audio-video clips to the latent cache (``soe encode``), and
the data modules that feed training from it.

- ``sources``   which clips and captions a folder holds (sidecar ``clip.txt`` or ``captions.jsonl``)
- ``media_io``  PyAV decoding: probe, frames at the expert's fps and size, audio at its sample rate
- ``windows``   cutting clips into windows of the recipe's clip length (duration buckets)
- ``annotate``  the ``Annotator`` hook that captions windows without one (off by default)
- ``annotate_run``, ``omni``, ``transcript``, ``annotation_store``, ``annotations_file``  ``soe annotate``: each
  window's own caption and sound description (Qwen2.5-Omni), transcript (sidecar, captions.jsonl or Whisper word
  timestamps, cut at word midpoints), the cache folder ``FILE.parts/``, and ``annotations.jsonl`` (one row per
  window) that ``soe encode`` reads
- ``text``      each expert's text conditioning (its own text encoder, or a pseudo-embedding for tiny experts)
- ``stream_format``, ``stream_writer``, ``stream_merge``  the cache ``soe encode`` writes (format 2, litdata
  chunks, text states once per caption): resumable per-part writer (``--shard I/N``) and the merge
- ``stream_read``, ``streaming``  reading it lazily; the batch sampler and data module training uses
- ``encode``    the pipeline, its settings and report; ``command_args``, ``report``: what it shares with ``soe annotate``
- ``datamodule``, ``latent_cache``  the data modules training uses (synthetic clips, cache format 1 read whole)
  and the batch sampler whose position is in the checkpoint
- ``synthetic``  the synthetic bouncing-square-and-click clips of the demo and the tests
- ``build``     the recipe's ``data`` section -> the data module

May import :mod:`soe.recipe` (encoding builds the experts' codecs and text encoders), :mod:`soe.stitch`,
:mod:`soe.flow`, :mod:`soe.plugin` and the foundation modules; never training, sampling or the command line.
"""
