"""Synthetic training data: the manifest builder (manifest.py), the filters (filters.py) and the
experiment that trains classifiers on what the pipeline generates (evaluate.py)."""
