"""MaskSAM bundle code, imported as ``scripts`` with the bundle root on ``sys.path``."""

from .loss import MaskSAMLoss
from .network import MaskSAM, semantic_probabilities

__all__ = ["MaskSAM", "MaskSAMLoss", "semantic_probabilities"]
