"""Data: CC3M-format captions (TSV and its sources), the frozen-feature cache, the VisDial and
MMDialog readers, and the synthetic benchmark generator."""
