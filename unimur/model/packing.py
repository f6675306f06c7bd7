"""FROMAGe's concatenated captions: pairs of examples packed into one sequence.

With probability ``concat_captions_prob`` per step (FROMAGe's default 0.5), the captioning pass
reads rows (0, 1), (2, 3), ... of the batch as one sequence each,

    image_1 caption_1 image_2 caption_2 <padding of 1> <padding of 2>

so the frozen LLM learns from contexts that interleave several images and texts, as dialogues
do. Labels travel with their tokens, so padding and visual positions stay masked. An odd last
row stays alone. The coin is a pure function of (seed, global batch index, pass), the same on
every rank and after a resume.
"""
from __future__ import annotations

import torch
from torch import Tensor

# one independent coin per training pass, as FROMAGe draws one per mode
CAPTIONING, RETRIEVAL = 0, 1


def concat_this_batch(p: float, seed: int, batch_idx: int, stream: int) -> bool:
    """Bernoulli(p) for global (micro-)batch `batch_idx` of a run: deterministic, rank-free."""
    if p <= 0:
        return False
    g = torch.Generator().manual_seed((seed * 1_000_003 + batch_idx) * 4 + stream + 1)
    return bool(torch.rand((), generator=g) < p)


def concat_pairs(mask: Tensor, *aligned: Tensor, pad: tuple[float | int, ...] | None = None
                 ) -> tuple[Tensor, ...]:
    """Pack rows (2i, 2i+1) into one row: the first row's attended positions, the second's,
    then all padding (order kept within each part).

    mask: (N, T) attention mask; aligned: tensors (N, T, ...) that move with it (embeddings,
    labels, ids); pad: fill value of each aligned tensor for the odd last row's extension.
    Returns (mask, *aligned), each (ceil(N/2), W) with W the longest packed row.
    """
    n, t = mask.shape
    m = n - n % 2
    first, second = slice(0, m, 2), slice(1, m, 2)
    packed_mask = torch.cat([mask[first], mask[second]], dim=1)                # (N/2, 2T)
    # a stable sort on "is padding" moves padding to the end and keeps the token order
    order = torch.sort((packed_mask == 0).to(torch.int8), dim=1, stable=True).indices
    width = int(packed_mask.sum(1).max()) if m else t
    out = [packed_mask.gather(1, order)[:, :width]]
    pad = pad if pad is not None else (0,) * len(aligned)
    for x, fill in zip(aligned, pad):
        both = torch.cat([x[first], x[second]], dim=1)
        # the mask may live on the host while x is on the device (model.caption_nll)
        at = order if x.device == order.device else order.to(x.device, non_blocking=True)
        idx = at.view(*order.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
        out.append(both.gather(1, idx)[:, :width])
    if n % 2:  # the odd one out, alone: both parts padded to one width, then stacked
        w = max(width, t)
        out = [torch.cat([_pad_to(packed, w, fill), _pad_to(x[-1:], w, fill)])
               for packed, x, fill in zip(out, (mask, *aligned), (0, *pad))]
    return tuple(out)


def _pad_to(x: Tensor, width: int, fill) -> Tensor:
    """(B, T, ...) -> (B, width, ...), new columns set to ``fill``."""
    if x.shape[1] >= width:
        return x
    return torch.cat([x, x.new_full((x.shape[0], width - x.shape[1], *x.shape[2:]), fill)], dim=1)
