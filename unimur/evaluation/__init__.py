"""Evaluation protocols (VisDial, MMDialog), their reports, and the method comparison's statistics."""
