"""Evaluation: how good a stitch is. ``metrics`` holds the AV-Align sync score, event detectors and the
Frechet distance; ``sync_eval`` measures sync and Frechet distances on held-out synthetic clips (the demo's
before/after numbers). May import :mod:`soe.data` and everything below it, never training or sampling.
"""
