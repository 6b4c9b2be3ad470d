"""Stitching: two experts joined block by block, and nothing else.

Owns the ``Stitcher`` and its two engines (``hook_engine``: one-way, each expert's own forward with forward
hooks; ``lockstep``: both split forwards side by side, with inserted blocks from ``depth``, taps and attention
key/value injection from ``attention_kv``), the connectors, the depth maps and time alignment by seconds
(``align``), the names of every hook a stitch installs (``named_hooks``), one-way stitching into any model
given its block list (``generic``), the checks on a stitched forward's batches (``batch_check``) and one sample's
long sequence split across ranks (``context_parallel``: diffusers' Ulysses context parallelism plus what a stitch adds).
May import :mod:`soe.plugin`, :mod:`soe.schema` and :mod:`soe.errors`.
"""
