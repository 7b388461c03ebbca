"""odsd-dist: distil a compact student from a trained teacher with open-world data (ODSD), at scale."""

__version__ = "0.1.0"
