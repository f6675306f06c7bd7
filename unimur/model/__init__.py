"""The model: UniMuR (frozen LLM + frozen image/text encoders + the trainable maps), its
backbones, tokenizer, caption packing and the pruned-folder format."""
