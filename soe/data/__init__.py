"""From a folder of audio-video clips to the latent cache that training reads (``soe encode``).

- ``sources``   which clips and captions a folder holds (sidecar ``clip.txt`` or ``captions.jsonl``)
- ``media_io``  PyAV decoding: probe, frames at the expert's fps and size, audio at its sample rate
- ``windows``   cutting clips into windows of the recipe's clip length (duration buckets)
- ``annotate``  the ``Annotator`` hook that captions windows without one (off by default)
- ``text``      each expert's text conditioning (its own text encoder, or a pseudo-embedding for tiny experts)
- ``writer``    the resumable, shard-atomic writer over ``soe.train.latent_cache``
- ``encode``    the pipeline, its settings and report
"""
