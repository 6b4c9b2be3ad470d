"""Shipped recipes, installed as package data: `soe stitch demo` finds recipes/demo.yaml by name from any folder."""
