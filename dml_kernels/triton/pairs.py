"""Triton pair losses and miners (registered on import)."""
