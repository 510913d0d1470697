"""repsim.data (being built)."""
