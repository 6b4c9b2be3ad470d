"""soe's built-in expert plugins, installed as ``soe.experts`` (the repo keeps them in ``experts/``).

Each module wraps one model family and registers through the ``soe.experts`` entry-point group in
``pyproject.toml``, exactly like a third-party plugin. ``DiffusersExpert`` (``soe.experts.diffusers_expert``)
is the public base class for plugins over a diffusers ``ModelMixin``.
"""
