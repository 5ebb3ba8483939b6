"""MaskSAM bundle code, imported as ``scripts`` with the bundle root on ``sys.path``."""

from .network import MaskSAM, semantic_probabilities

__all__ = ["MaskSAM", "semantic_probabilities"]
