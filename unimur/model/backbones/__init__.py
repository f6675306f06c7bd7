"""The frozen backbones: hub models (transformers, open_clip) and the offline demo's models."""
