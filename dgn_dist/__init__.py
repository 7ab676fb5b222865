"""dgn_dist: distributed DGNOpt."""

__version__ = "0.1.0"
