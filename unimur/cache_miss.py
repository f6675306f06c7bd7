"""The feature cache's miss exception (shared by ``feature_cache`` and ``cache_io``)."""


class CacheMiss(Exception):
    """No usable cache. kind: ``missing`` (never built), ``stale`` (key changed), ``corrupt``."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
