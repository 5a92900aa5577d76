"""Data files shipped with cora (read through importlib.resources)."""
