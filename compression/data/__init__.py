"""Data: the built-in ShapesVQA set and, as they land, the user's data sources and scoring. Knows nothing of models."""
