"""UniMuR: a frozen causal LLM and frozen CLIP joined by a few trainable linear layers.

Trainable parts (SPEC section 1), everything else is frozen:
  cap_mapping      W_cap: CLIP-V feature -> k LLM input embeddings (images into the LLM)
  ret_embedding    the [RET] input embedding, spliced into `inputs_embeds` at [RET] ids
  unified_mapping  W_u:   LLM hidden state at [RET] -> retrieval space (unified embedding u)
  image_proj/text_proj  W_v / W_t (target_proj=linear only)
  logit_scale      s = exp(tau), learnable temperature of the contrastive losses

The LLM's vocabulary matrix is never resized or trained: [RET]'s input row is our own
parameter and its output logit (LMret) is tied to it.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from unimur.config import ModelConfig
from unimur.model.backbones.base import FrozenEncoders, ImageFeatures, freeze
from unimur.model.backbones.registry import load_encoders, load_llm
from unimur.model.packing import concat_pairs
from unimur.model.pretrained import read_pretrained
from unimur.model.tokenizer import build_tokenizer
from unimur.utils.images import prepare_image

logger = logging.getLogger(__name__)

# A context piece: text, a PIL image, or an image's W_cap input feature (see `cap_input`).
Piece = Union[str, Image.Image, torch.Tensor]


@dataclass
class UniMuROutput:
    """Per-batch outputs the losses consume (local shard; N = local batch)."""

    u: torch.Tensor                   # (N, E) unified embeddings, L2-normalised
    v: torch.Tensor                   # (N, E) image targets, L2-normalised
    t: torch.Tensor | None            # (N, E) text targets (None for method=fromage)
    caption_nll: torch.Tensor         # () summed token NLL of the captioning pass
    caption_tokens: torch.Tensor      # () number of caption target tokens
    logit_scale: torch.Tensor         # () s = exp(tau), clamped
    lm_nll: torch.Tensor | None = None    # () summed NLL of "caption [RET]" (LMret)
    lm_tokens: torch.Tensor | None = None


class UniMuR(nn.Module):
    def __init__(self, config: ModelConfig, llm: nn.Module, encoders: FrozenEncoders, tokenizer, ret_id: int):
        super().__init__()
        self.config = config
        self.llm = llm
        self.encoders = encoders
        self.tokenizer = tokenizer
        self.ret_id = ret_id
        self._bos_ids = _bos_prefix(tokenizer)

        embed = llm.get_input_embeddings()
        in_dim = embed.embedding_dim                       # LLM input embedding size
        out_dim = llm.get_output_embeddings().in_features  # last hidden size seen by lm_head
        self.vocab_size = llm.get_output_embeddings().out_features
        if ret_id > self.vocab_size:
            raise ValueError(f"[RET] id {ret_id} is beyond the LLM vocabulary ({self.vocab_size})")
        k = config.n_visual_tokens
        feat_dim = encoders.image_pooled_dim if config.visual_feature == "pooled" else encoders.image_embed_dim

        if config.target_proj == "linear":
            emb_dim = config.shared_emb_dim
            self.image_proj = nn.Linear(feat_dim, emb_dim)
            self.text_proj = nn.Linear(encoders.text_embed_dim, emb_dim) if config.method == "unimur" else None
        else:
            emb_dim = encoders.image_embed_dim
            if encoders.text_embed_dim != emb_dim:
                raise ValueError("target_proj=none needs a joint image-text space; use target_proj=linear")
            self.image_proj = self.text_proj = None
        self.emb_dim = emb_dim

        self.cap_mapping = nn.Linear(feat_dim, k * in_dim)
        # W_u per [RET] layer (FROMAGe's text_hidden_fcs): the last layer's state has lm_head's
        # input size, the others the body's hidden size (they differ for e.g. OPT-350m)
        self.text_emb_layers = _resolve_layers(config.text_emb_layers, llm)
        dims = [out_dim if i == -1 else llm.config.hidden_size for i in self.text_emb_layers]
        self.unified_mapping = nn.Linear(dims[0], emb_dim)
        self.extra_unified_mappings = nn.ModuleList(nn.Linear(d, emb_dim) for d in dims[1:])
        self.image_dropout = nn.Dropout(config.image_embed_dropout_prob)
        self.text_dropout = nn.Dropout(config.text_embed_dropout_prob)
        with torch.no_grad():
            table = embed.weight.float()
            self.ret_embedding = nn.Parameter(table.mean(0).clone())
            # FROMAGe keeps [RET] at the typical token norm (the mean row is much shorter).
            # (A model built on the meta device, to count parameters, has no norms.)
            self.ret_target_norm = 1.0 if table.is_meta else float(table.norm(dim=-1).mean())
        if config.ret_renorm and not table.is_meta:
            self.renorm_ret_embedding()
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))

    # ------------------------------------------------------------------ building

    @classmethod
    def build(cls, config: ModelConfig, device: torch.device | str | None = None) -> "UniMuR":
        """Load the frozen backbones named in `config` and initialise the trainable layers
        (a CUDA `device`: the LLM's weights load straight onto it; move the rest with .to())."""
        llm = load_llm(config.llm, config.llm_dtype, device=device)
        encoders = load_encoders(config.visual_model, config.text_model, config.encoder_dtype)
        tokenizer, ret_id = build_tokenizer(config.llm)
        return cls(config, llm, encoders, tokenizer, ret_id)

    @classmethod
    def from_pretrained(cls, model_dir, device="cpu") -> "UniMuR":
        """Rebuild a pruned model folder (`unimur_model/`, checked by
        `unimur.model.pretrained.read_pretrained`): the frozen backbones from the identifiers in
        its config, then its trainable weights, strictly."""
        folder = read_pretrained(model_dir)
        config = folder.config
        llm = load_llm(config.llm, config.llm_dtype)
        encoders = load_encoders(config.visual_model, config.text_model, config.encoder_dtype)
        model = cls(config, llm, encoders, folder.tokenizer, folder.ret_id)
        model.load_trainable_state_dict(folder.state, source=str(folder.weights_path))
        logger.info("loaded %s (%s, %s + %s)", model_dir, config.method, config.llm, config.visual_model)
        return model.to(device).eval()

    @classmethod
    def skeleton(cls, config: ModelConfig) -> "UniMuR":
        """The model's architecture on the meta device: parameter names and shapes from the
        config alone, no weights loaded (checks a checkpoint against its config)."""
        with torch.device("meta"):
            llm = load_llm(config.llm, config.llm_dtype, weights=False)
            encoders = load_encoders(config.visual_model, config.text_model, config.encoder_dtype, weights=False)
            return cls(config, freeze(llm), encoders, tokenizer=None, ret_id=0)

    def train(self, mode: bool = True) -> "UniMuR":
        super().train(mode)
        self.llm.eval()  # frozen backbones stay in eval mode (no dropout) while training
        self.encoders.eval()
        return self

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        names = {n for n, _ in self.trainable_named_parameters()}
        return {n: t for n, t in self.state_dict().items() if n in names}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load trainable weights strictly; a clear error names missing, unexpected or misshapen keys."""
        own = self.trainable_state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        shapes = [f"{k}: {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in own.items() if k in state and state[k].shape != v.shape]
        if missing or unexpected or shapes:
            raise ValueError(f"{source} does not match this model: missing {missing}, "
                             f"unexpected {unexpected}, shape mismatches {shapes}")
        self.load_state_dict(state, strict=False)

    def frozen_parameter_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if not p.requires_grad]

    @property
    def device(self) -> torch.device:
        return self.ret_embedding.device

    @torch.no_grad()
    def renorm_ret_embedding(self) -> None:
        self.ret_embedding.mul_(self.ret_target_norm / self.ret_embedding.norm().clamp(min=1e-12))

    # ------------------------------------------------------------- frozen encoders

    def encode_images(self, pixels: torch.Tensor) -> ImageFeatures:
        """Frozen CLIP-V on preprocessed pixels (N, 3, H, W)."""
        return self.encoders.encode_image(pixels)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Frozen CLIP-T on raw strings -> (N, Dt), unnormalised."""
        return self.encoders.encode_text(list(texts))

    def cap_input(self, feats: ImageFeatures) -> torch.Tensor:
        """The CLIP-V feature fed to W_cap and W_v (config.visual_feature)."""
        x = feats.pooled if self.config.visual_feature == "pooled" else feats.embed
        return x.to(self.cap_mapping.weight.dtype)

    def image_targets(self, feats: ImageFeatures) -> torch.Tensor:
        """v = norm(CLIP-V(x)) or norm(W_v CLIP-V(x)): (N, E)."""
        if self.image_proj is None:
            return F.normalize(feats.embed.float(), dim=-1)
        return F.normalize(self.image_dropout(self.image_proj(self.cap_input(feats))), dim=-1)

    def text_targets(self, text_feats: torch.Tensor) -> torch.Tensor:
        """t = norm(CLIP-T(caption)) or norm(W_t CLIP-T(caption)): (N, E)."""
        if self.text_proj is None:
            return F.normalize(text_feats.float(), dim=-1)
        return F.normalize(self.text_proj(text_feats.to(self.text_proj.weight.dtype)), dim=-1)

    # ---------------------------------------------------------------- LLM side

    @property
    def max_positions(self) -> int | None:
        """Positions the LLM can attend (OPT-6.7B: 2048); None when its config does not say."""
        n = getattr(self.llm.config, "max_position_embeddings", None)
        return int(n) if n else None

    @property
    def _llm_dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, H_in) input embeddings, the [RET] parameter spliced in."""
        is_ret = input_ids == self.ret_id
        emb = self.llm.get_input_embeddings()(input_ids.masked_fill(is_ret, 0))
        return torch.where(is_ret.unsqueeze(-1), self.ret_embedding.to(emb.dtype), emb)

    def map_images(self, cap_features: torch.Tensor) -> torch.Tensor:
        """W_cap: (N, D) CLIP-V features -> (N, k, H_in) LLM input embeddings."""
        n = cap_features.shape[0]
        return self.cap_mapping(cap_features).view(n, self.config.n_visual_tokens, -1)

    @property
    def _all_layers(self) -> bool:
        """Whether u reads layers other than the last (then every layer's states are kept)."""
        return self.text_emb_layers != [-1]

    def run_llm(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, all_layers: bool = False):
        """Frozen LLM body on (B, T, H_in) embeddings -> (B, T, H) last-layer hidden states,
        and with ``all_layers`` also the tuple of every layer's states (hidden_states[i]).

        Positions count only attended tokens, so left- and right-padded batches see the
        same positions for the same tokens (Llama-style models default to arange).
        """
        attention_mask = attention_mask.to(inputs_embeds.device, non_blocking=True)  # host masks: see forward
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.llm.base_model(
            inputs_embeds=inputs_embeds.to(self._llm_dtype),
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            output_hidden_states=all_layers,
        )
        return (out.last_hidden_state, out.hidden_states) if all_layers else out.last_hidden_state

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V) logits; the [RET] logit is tied to the [RET] parameter."""
        logits = self.llm.get_output_embeddings()(hidden)
        ret_logit = hidden @ self.ret_embedding.to(hidden.dtype)
        if self.ret_id == self.vocab_size:
            return torch.cat([logits, ret_logit.unsqueeze(-1)], dim=-1)
        # in place is safe: linear's backward keeps its input and weight, not its output
        logits[..., self.ret_id] = ret_logit
        return logits

    def unified_from_hidden(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
                            layers: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Read the last attended position (where [RET] sits) -> u = norm(sum_l W_u^l h_l): (B, E).

        hidden: (B, T, H) last-layer states; layers: every layer's states (needed only when
        text_emb_layers names layers other than the last).
        """
        last = last_position(attention_mask)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        states = [(hidden if i == -1 else layers[i])[rows, last] for i in self.text_emb_layers]
        mappings = [self.unified_mapping, *self.extra_unified_mappings]
        z = sum(self.text_dropout(w(h.to(w.weight.dtype))) for w, h in zip(mappings, states))
        return F.normalize(z, dim=-1)

    def unified_from_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            return_hidden: bool = False):
        """u for token sequences that end in [RET] (left or right padded): (B, E).

        With ``return_hidden`` also returns (hidden, ids, mask) of the pass, in the layout it
        ran in (left-aligned when gradients are on: see `_run_llm_ret_last`), on the device the
        ids were given on.

        The ids are checked (and left-aligned) where the caller keeps them, then moved to the
        model's device: the trainer passes host tensors, so these data-dependent checks never
        make the host wait for the GPU.
        """
        last = last_position(attention_mask)
        if not bool((input_ids.gather(1, last[:, None]) == self.ret_id).all()):
            raise ValueError("every sequence must end with [RET] at its last attended position")
        layers = None
        split = torch.is_grad_enabled() and self.ret_embedding.requires_grad
        if split:
            input_ids, attention_mask = left_align(input_ids, attention_mask)
            split = input_ids.shape[1] > 1 and not bool((input_ids[:, :-1] == self.ret_id).any())
        ids, mask = (t.to(self.device, non_blocking=True) for t in (input_ids, attention_mask))
        if split:
            hidden, layers = self._run_llm_ret_last(ids, mask)
        elif self._all_layers:
            hidden, layers = self.run_llm(self.embed_tokens(ids), mask, all_layers=True)
        else:
            hidden = self.run_llm(self.embed_tokens(ids), mask)
        u = self.unified_from_hidden(hidden, mask, layers)
        return (u, hidden, input_ids, attention_mask) if return_hidden else u

    def _run_llm_ret_last(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`run_llm` for left-aligned sequences whose only trainable input is the final [RET]
        (the caller checks that no other [RET] sits in the prefix, where it would need a gradient).

        The text before [RET] is made of frozen token embeddings, so no gradient can flow
        into it: it runs once without autograd and leaves its keys and values in a cache, and
        only the [RET] position runs with autograd on top of that cache. Same values and same
        gradients as the full pass (tests/test_model.py), but the backward pass through the
        frozen LLM covers one position instead of the whole caption.
        """
        prefix_ids = input_ids[:, :-1]
        every = self._all_layers
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        body = self.llm.base_model
        with torch.no_grad():
            prefix = body(inputs_embeds=self.embed_tokens(prefix_ids).to(self._llm_dtype),
                          attention_mask=attention_mask[:, :-1], position_ids=position_ids[:, :-1],
                          use_cache=True, output_hidden_states=every)
        ret_in = self.ret_embedding.to(self._llm_dtype).expand(input_ids.shape[0], 1, -1)
        ret = body(inputs_embeds=ret_in, attention_mask=attention_mask,
                   position_ids=position_ids[:, -1:], use_cache=True, output_hidden_states=every,
                   **{cache_kwarg(body): output_cache(prefix)})
        hidden = torch.cat([prefix.last_hidden_state, ret.last_hidden_state], dim=1)
        layers = ([torch.cat(pair, dim=1) for pair in zip(prefix.hidden_states, ret.hidden_states)]
                  if every else None)
        return hidden, layers

    def caption_nll(self, cap_features: torch.Tensor, caption_ids: torch.Tensor,
                    caption_mask: torch.Tensor, concat_captions: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CL: image prefix (k mapped tokens) then the caption; NLL of caption tokens only.

        Visual positions, padding and a leading BOS are not targets. With ``concat_captions``
        rows (0, 1), (2, 3), ... run as one sequence each (`unimur.model.packing`). Returns the
        summed NLL and the token count so the loss can be normalised over the global batch.
        """
        n, k = caption_ids.shape[0], self.config.n_visual_tokens
        visual = self.image_dropout(self.map_images(cap_features))  # (N, k, H_in)
        # ids and mask stay where the caller keeps them (the trainer: on the host) for the
        # labels, packing widths and target positions, which then cost no device sync
        text = self.embed_tokens(caption_ids.to(visual.device, non_blocking=True))  # (N, L, H_in)
        inputs = torch.cat([visual.to(text.dtype), text], dim=1)
        mask = torch.cat([caption_mask.new_ones(n, k), caption_mask], dim=1)
        # each position's own token as its label (-100: not a target); position p predicts p+1
        labels = torch.cat([caption_ids.new_full((n, k), -100), self._labels(caption_ids, caption_mask)], dim=1)
        if concat_captions:
            mask, inputs, labels = concat_pairs(mask, inputs, labels, pad=(0.0, -100))
        hidden = self.run_llm(inputs, mask)                        # (N or N/2, T, H)
        return self._token_nll(hidden[:, :-1], labels[:, 1:])

    def _labels(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Targets: attended tokens except the leading BOS (left or right padding)."""
        labels = ids.masked_fill(mask == 0, -100)
        if self._bos_ids:
            first = mask.long().argmax(-1)  # first attended column of each row
            rows = torch.arange(ids.shape[0], device=ids.device)
            for j in range(len(self._bos_ids)):
                labels[rows, (first + j).clamp(max=ids.shape[1] - 1)] = -100
        return labels

    def next_token_labels(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T-1) targets for hidden[:, :-1] of a text-only sequence (LMret). The first
        attended token is never a target: nothing real precedes it (with left padding a pad
        position would otherwise "predict" it)."""
        labels = self._labels(ids, mask)
        labels[torch.arange(ids.shape[0], device=ids.device), mask.long().argmax(-1)] = -100
        return labels[:, 1:]

    def _token_nll(self, pred_hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sel = labels != -100
        # logits only where there is a target: avoids a (N, T, V) tensor over padding. The
        # positions are found where the labels are (host labels: no device sync) and moved.
        at = sel.nonzero(as_tuple=True)
        targets = labels[at].to(pred_hidden.device, non_blocking=True)
        rows, cols = (i.to(pred_hidden.device, non_blocking=True) for i in at)
        logits = self.lm_logits(pred_hidden[rows, cols]).float()
        nll = F.cross_entropy(logits, targets, reduction="sum")
        return nll, rows.new_tensor(rows.shape[0])

    # ------------------------------------------------------------------ training

    def forward(self, image_features: ImageFeatures, text_features: torch.Tensor | None,
                caption_ids: torch.Tensor, caption_mask: torch.Tensor,
                ret_ids: torch.Tensor, ret_mask: torch.Tensor, with_lm: bool = False,
                with_text: bool = True, with_caption: bool = True, concat_captions: bool = False
                ) -> UniMuROutput:
        """One training batch: both LLM passes plus the alignment targets.

        The four id/mask tensors may stay on the host (the trainer keeps them there): every
        data-dependent decision about them (labels, target positions, packing widths, the
        [RET] checks) is then made without waiting for the GPU, and they move when used.

        with_caption=False skips the captioning pass (its loss weight is 0): half the LLM work.
        concat_captions: the captioning pass reads pairs of examples as one sequence.
        """
        if with_caption:
            caption_nll, caption_tokens = self.caption_nll(self.cap_input(image_features), caption_ids,
                                                           caption_mask, concat_captions)
        else:
            caption_nll = caption_tokens = torch.zeros((), device=self.device)
        u, hidden, ret_ids, ret_mask = self.unified_from_tokens(ret_ids, ret_mask, return_hidden=True)
        lm_nll = lm_tokens = None
        if with_lm:  # LMret: teach the LLM to emit [RET] after a caption
            lm_nll, lm_tokens = self._token_nll(hidden[:, :-1], self.next_token_labels(ret_ids, ret_mask))
        v = self.image_targets(image_features)
        t = None
        if self.config.method == "unimur" and with_text:
            if text_features is None:
                raise ValueError("method=unimur needs CLIP-T text features")
            t = self.text_targets(text_features)
        scale = self.logit_scale.clamp(max=self.config.logit_scale_max).exp()
        return UniMuROutput(u=u, v=v, t=t, caption_nll=caption_nll, caption_tokens=caption_tokens,
                            logit_scale=scale, lm_nll=lm_nll, lm_tokens=lm_tokens)

    # ----------------------------------------------------------------- inference

    @torch.no_grad()
    def encode_context(self, contexts: Sequence[Sequence[Piece]], *, padding_side: str = "right",
                       max_len: int | None = None) -> torch.Tensor:
        """Unified embeddings for interleaved contexts: (B, E), L2-normalised.

        Each context is a sequence of pieces: text, a PIL image, or an image's W_cap input
        feature (1-D tensor, `cap_input` of its ImageFeatures). Text goes in as tokens (BOS
        once at the start, as in training), each image as its k mapped embeddings, then
        [RET]. Contexts longer than `max_len` keep their most recent positions.
        """
        inputs, mask = pad_embeddings([self._context_embeddings(ctx, max_len) for ctx in contexts],
                                      padding_side)
        if self._all_layers:
            hidden, layers = self.run_llm(inputs, mask, all_layers=True)
            return self.unified_from_hidden(hidden, mask, layers)
        return self.unified_from_hidden(self.run_llm(inputs, mask), mask)

    def _context_embeddings(self, context: Sequence[Piece], max_len: int | None, with_ret: bool = True
                            ) -> torch.Tensor:
        ids = torch.tensor(self._bos_ids, dtype=torch.long, device=self.device)
        parts = [self.embed_tokens(ids[None])[0]] if self._bos_ids else []
        images = [p for p in context if not isinstance(p, str)]
        mapped = iter(self.map_images(self._image_pieces(images)) if images else [])
        for piece in context:
            if isinstance(piece, str):
                tok = self.tokenizer(piece, add_special_tokens=False)["input_ids"]
                if tok:
                    parts.append(self.embed_tokens(torch.tensor([tok], device=self.device))[0])
            else:
                parts.append(next(mapped).to(self._llm_dtype))
        if with_ret:
            parts.append(self.ret_embedding.to(self._llm_dtype)[None])
        seq = torch.cat(parts, dim=0)  # (T, H_in), [RET] last (with_ret)
        if max_len is not None and seq.shape[0] > max_len:
            seq = seq[-max_len:]
        return seq

    def _image_pieces(self, images: list) -> torch.Tensor:
        """PIL images and/or precomputed features -> (n, D) W_cap inputs."""
        out = []
        for img in images:
            if isinstance(img, Image.Image):
                pixels = self.encoders.preprocess(prepare_image(img))[None]  # the loader's rules
                out.append(self.cap_input(self.encode_images(pixels))[0])
            else:
                out.append(img.to(self.device, self.cap_mapping.weight.dtype))
        return torch.stack(out)


def _resolve_layers(layers: Sequence[int], llm: nn.Module) -> list[int]:
    """Layer indices into the LLM's hidden_states (n_layers + 1 of them: embeddings, then each
    layer); the last layer, by any of its names, becomes -1 (lm_head's input)."""
    n = int(getattr(llm.config, "num_hidden_layers", 0) or 0)
    out = []
    for i in layers:
        if n and not -(n + 1) <= i <= n:
            raise ValueError(f"text_emb_layers: layer {i} requested, but the LLM has {n} layers "
                             f"(hidden states -{n + 1}..{n})")
        out.append(-1 if i in (-1, n) else i)
    return out


def cache_kwarg(body: nn.Module) -> str:
    """transformers renamed `past_key_values` to `cache` during 5.x; accept either."""
    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"


def output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def left_align(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift each row so its attended tokens end at the last column (left padding): (ids, mask).

    Assumes each row's attended tokens are contiguous (left or right padding)."""
    t = mask.shape[1]
    shift = (t - 1 - last_position(mask))[:, None]                         # (B, 1)
    src = (torch.arange(t, device=mask.device)[None, :] - shift) % t        # column to read
    return ids.gather(1, src), mask.gather(1, src)


def pad_embeddings(seqs: Sequence[torch.Tensor], padding_side: str = "right"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(T_i, H) sequences -> (B, T_max, H) zero-padded inputs and the (B, T_max) attention mask."""
    width, h = max(s.shape[0] for s in seqs), seqs[0].shape[1]
    inputs = seqs[0].new_zeros(len(seqs), width, h)
    mask = torch.zeros(len(seqs), width, dtype=torch.long, device=seqs[0].device)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if padding_side == "left" else slice(0, len(s))
        inputs[i, span], mask[i, span] = s, 1
    return inputs, mask


def last_position(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended token per row, for left or right padding: (B,)."""
    t = attention_mask.shape[1]
    return t - 1 - attention_mask.flip(-1).long().argmax(-1)


def _bos_prefix(tokenizer) -> list[int]:
    """Ids the tokenizer prepends by itself (OPT: [</s>]; GPT-2: [])."""
    if tokenizer is None:  # skeleton models
        return []
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    n = len(with_special) - len(plain)
    return list(with_special[:n]) if n > 0 and with_special[n:] == plain else []


def load_pretrained(model_dir, device="cpu") -> UniMuR:
    """A pruned model folder as a model: :meth:`UniMuR.from_pretrained`."""
    return UniMuR.from_pretrained(model_dir, device)
