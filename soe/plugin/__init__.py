"""The expert contract: what a plugin implements to make a model family stitchable, and how soe finds it.

Owns ``Expert`` (the split forward ``embed -> run_block -> head``, ``TokenLayout``, ``BlockState``), the
registry over the ``soe.experts`` entry points (``get_expert``, ``register_expert``), the torch-free listings
``soe experts`` prints, shape-only stand-ins for ``soe inspect``, lazy readers of weight folders, the codec
base, and ``attend`` (softmax attention through diffusers' dispatcher, for processors a plugin or soe writes).
May import only :mod:`soe.errors` and :mod:`soe.schema` (and torch and the model libraries): nothing here knows
about stitching, training or sampling. The checks a plugin must pass live in :mod:`soe.testing`.
"""
