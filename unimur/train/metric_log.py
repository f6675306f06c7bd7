"""Metric sink shared by training and evaluation: TensorBoard events plus `metrics.jsonl`.

Only rank 0 constructs one with a folder; elsewhere it is a no-op, so callers never branch.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


class MetricLogger:
    def __init__(self, run_dir: Path | None):
        self.run_dir = run_dir
        self._writer = None
        self._jsonl = None
        if run_dir is None:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(run_dir))
        except ImportError:  # tensorboard is in requirements.txt; keep jsonl if it is absent
            logger.warning("tensorboard is not installed: metrics go to metrics.jsonl only")

    def log(self, split: str, metrics: dict[str, float], step: int) -> None:
        if self._jsonl is None:
            return
        self._jsonl.write(json.dumps({"split": split, "step": step, **metrics}) + "\n")
        if self._writer is not None:
            for k, v in metrics.items():
                self._writer.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
