"""Flow matching as training and sampling share it: the rectified-flow objective per modality (noising,
velocity or x0 loss, timestep densities and shifts, loss balancing) in ``objective``, and conditioning in
``conditioning`` (latent frames given clean for v2a / a2v / image / extend tasks, the seeded task mixture).
May import :mod:`soe.plugin`, :mod:`soe.schema`, :mod:`soe.rng` and :mod:`soe.errors`.
"""
