"""Rank profiles: rank measures of layers across checkpoints, and their association with quality.

``measures`` turns one rank sweep into rank measures with bootstrap
uncertainty; ``association`` relates a measure to a quality value (test
accuracy) across checkpoints with rank correlations, permutation p-values and
bootstrap intervals; ``profile`` runs the whole experiment over checkpoints
(:func:`peekcore.rank_profile`); ``checkpoints`` loads them safely, and
:func:`accuracy` gives a classifier's quality on labelled data.
"""

from .checkpoints import accuracy

__all__ = ["accuracy"]
