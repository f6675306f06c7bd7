"""What every frozen backbone is: the encoders' interface and outputs, storage dtypes, freezing."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def freeze(module: nn.Module) -> nn.Module:
    """No gradients, eval mode (dropout off). UniMuR.train() keeps frozen parts in eval."""
    module.requires_grad_(False)
    return module.eval()


@dataclass
class ImageFeatures:
    """Frozen image-encoder outputs for a batch, unnormalised.

    pooled: (N, Dp) pre-projection pooled feature (FROMAGe's input to its linear maps).
    embed:  (N, Dv) joint image-text embedding (CLIP-V); equals `pooled` for encoders
            that have no joint space.
    """

    pooled: torch.Tensor
    embed: torch.Tensor

    def to(self, *args, **kwargs) -> "ImageFeatures":
        return ImageFeatures(self.pooled.to(*args, **kwargs), self.embed.to(*args, **kwargs))


class FrozenEncoders(nn.Module):
    """Interface of the frozen image and text encoders (CLIP-V / CLIP-T).

    identity: stable string naming weights and preprocessing (feature-cache key).
    """

    identity: str
    image_pooled_dim: int
    image_embed_dim: int
    text_embed_dim: int
    preprocess: Callable[[Image.Image], torch.Tensor]  # PIL -> (3, H, W)

    def encode_image(self, pixels: torch.Tensor) -> ImageFeatures:  # pixels: (N, 3, H, W)
        raise NotImplementedError

    def encode_text(self, texts: list[str]) -> torch.Tensor:  # -> (N, Dt)
        raise NotImplementedError

    def train(self, mode: bool = True) -> "FrozenEncoders":
        return super().train(False)  # frozen: never leave eval mode
