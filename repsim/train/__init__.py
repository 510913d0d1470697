"""repsim.train (being built)."""
