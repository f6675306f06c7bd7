"""Inference: embedding dialogues, images and texts; retrieval over pools; FROMAGe's generative
rules; the session shared by the retrieve command and the app."""
