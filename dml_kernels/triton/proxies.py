"""Triton proxy losses (registered on import)."""
