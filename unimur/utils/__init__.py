"""Helpers every layer may use: process groups, file hashing and atomic writes, the safetensors
stream, numeric precision."""
