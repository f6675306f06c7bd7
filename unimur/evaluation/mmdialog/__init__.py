"""The MMDialog protocol: queries, per-query pools, chunked scoring."""
