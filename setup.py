"""Packages are found, not listed: every package under soe/, plus the repository's experts/ and recipes/
folders (and any package inside them), installed as soe.experts and soe.recipes (``package-dir`` in
pyproject.toml, where everything else about the build lives). pyproject.toml alone cannot find packages
under two roots and install one of them under a prefix, hence this file."""
from setuptools import find_packages, setup

FOLDERS = ["experts", "experts.*", "recipes", "recipes.*"]  # installed under soe.
setup(packages=find_packages(include=["soe", "soe.*"]) + [f"soe.{name}" for name in find_packages(include=FOLDERS)])
