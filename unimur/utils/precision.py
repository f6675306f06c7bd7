"""The training precision checked against the GPU at start-up, and the settings it implies.

bf16 needs an Ampere-class GPU or newer (compute capability 8.0): a V100 (sm_70) has no bf16
tensor cores, and recent PyTorch reports bf16 as "supported" there by emulation, orders of
magnitude slower, so the capability itself is checked. Such a run stops at once, in one line
that names the fix (`--precision fp16`), instead of crawling or failing hours in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from unimur.errors import UniMuRError

BF16_MIN_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class GPUInfo:
    """What the plan and the precision check need to know about the run's GPU."""

    name: str
    capability: tuple[int, int]
    total_gib: float

    @property
    def arch(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}"


def detected_gpu(index: int = 0) -> GPUInfo | None:
    """The GPU this process would train on, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(index)
    return GPUInfo(props.name, (props.major, props.minor), props.total_memory / 2**30)


def check_precision(precision: str, gpu: GPUInfo | None) -> None:
    """Raise a one-line error when the GPU cannot run ``precision`` (no GPU: nothing to check)."""
    if gpu is None or precision != "bf16" or gpu.capability >= BF16_MIN_CAPABILITY:
        return
    raise UniMuRError(f"--precision bf16: {gpu.name} ({gpu.arch}) has no bf16 support (needs sm_80 or newer, "
                      f"e.g. A100, H100); pass --precision fp16 (the frozen LLM is then stored in fp16 too)")


def default_llm_dtype(precision: str) -> str:
    """Storage dtype of the frozen LLM when --llm-dtype is not given: the training precision's
    16-bit type (OPT-6.7B: 12.4 GiB instead of 24.8 in fp32), fp32 with --precision fp32."""
    return precision if precision in ("bf16", "fp16") else "fp32"


def enable_tf32() -> None:
    """TF32 matmuls and convolutions for what still runs in fp32 on Ampere+ GPUs (the trainable
    layers, the loss); these switches do nothing on a CPU or on older GPUs."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
