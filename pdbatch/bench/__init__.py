"""Measurement scripts (not tests). Each module runs with `python -m pdbatch.bench.<name>`."""
