"""soe — Stitching of Experts: join two pretrained diffusion transformers with light connectors."""
from soe.align import linear_pairs, resolve_depth_map
from soe.connector import Connector, ConnectorSpec
from soe.expert import BlockState, Expert, TokenLayout
from soe.generic import BlockListExpert, stitch_into
from soe.registry import get_expert, list_experts, register_expert
from soe.stitcher import Stitcher

__version__ = "0.1.0"

__all__ = [
    "BlockListExpert", "BlockState", "Connector", "ConnectorSpec", "Expert", "Stitcher", "TokenLayout",
    "get_expert", "linear_pairs", "list_experts", "register_expert", "resolve_depth_map", "stitch_into",
]
