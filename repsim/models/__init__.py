"""repsim.models (being built)."""
