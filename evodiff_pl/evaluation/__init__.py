"""Scores: Fréchet distances and their feature extractors (`metrics`, `classifier`), the validation callback."""
