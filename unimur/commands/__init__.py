"""The command-line programs: one module per command; all flag parsing lives here. Nothing in
``unimur`` imports this package (the seed's script paths are thin wrappers over it)."""
