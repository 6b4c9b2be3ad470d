"""Recipes: one YAML file (plus ``key=value`` overrides) turned into checked options and built objects.

``reading`` finds and reads recipes (shipped ones by name, overrides, literal prompts, paths relative to the
recipe), ``validate`` checks what the option dataclasses cannot (names in the registry, folders, depths, block
pairs, tasks), ``builders`` builds what every command shares: the experts, the Stitcher, codecs, text encoders
and sampler settings. The option dataclasses themselves are :mod:`soe.schema` (every layer takes them).
May import :mod:`soe.stitch`, :mod:`soe.flow`, :mod:`soe.lora`, :mod:`soe.plugin` and the foundation modules;
training and data build what only they need themselves (:mod:`soe.train.build`, :mod:`soe.data.build`).
"""
