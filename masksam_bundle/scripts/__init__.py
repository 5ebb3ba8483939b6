"""MaskSAM bundle code, imported as ``scripts`` with the bundle root on ``sys.path``."""

from . import cli

cli.install()  # on a `python -m monai.bundle` command line: override check and one-line errors (see cli.py)

from .loss import MaskSAMLoss  # noqa: E402
from .network import MaskSAM, semantic_probabilities  # noqa: E402

__all__ = ["MaskSAM", "MaskSAMLoss", "semantic_probabilities"]
