"""Solvers driving passes: CP-ALS and nonnegative CP (HALS)."""

from .als import cp_als

__all__ = ["cp_als"]
