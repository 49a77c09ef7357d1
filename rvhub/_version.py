"""rvhub's version, importable without importing anything else of rvhub (or torch)."""

__version__ = "0.1.0"
