"""Solvers driving passes: CP-ALS and nonnegative CP (HALS)."""

from .als import cp_als
from .hals import ncp_hals

__all__ = ["cp_als", "ncp_hals"]
