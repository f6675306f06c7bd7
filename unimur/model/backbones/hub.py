"""Frozen backbones from the hub (or a local copy): the causal LLM (transformers) and the
image/text encoders (open_clip), plus the tests' tiny random-init ones. The offline demo's models
are in :mod:`unimur.model.backbones.offline`; :mod:`unimur.model.backbones.registry` picks the
loader by identifier (its ``load_llm`` / ``load_encoders`` are the ones to call).

Identifiers understood by :func:`load_llm`:
  * a hub id or local directory of any ``AutoModelForCausalLM`` (``facebook/opt-6.7b``);
  * ``tiny-opt``: a small random-init ``OPTForCausalLM`` for tests (fixed seed, so the
    same identifier always yields the same weights);

Identifiers understood by :func:`load_encoders` (``visual_model``):
  * ``openai/clip-vit-large-patch14`` (the seed README's name) -> open_clip ``ViT-L-14:openai``;
  * ``NAME`` or ``NAME:pretrained_tag`` of an open_clip model, e.g. ``ViT-B-32:openai``;
  * a local open_clip checkpoint ``NAME:/path/to/weights.bin`` or ``local-dir:/path``;
  * ``tiny-clip``: a small random-init open_clip CLIP (both towers, fixed seed) for tests;
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from unimur.model.backbones.base import DTYPES, FrozenEncoders, ImageFeatures, freeze

logger = logging.getLogger(__name__)

# Backbones built from a fixed seed, so that e.g. a pruned checkpoint trained on
# `tiny-opt` can rebuild bit-identical frozen weights from its identifier alone.
BUILTIN_SEED = 0

# The seed README names CLIP by its Hugging Face id; open_clip calls it differently.
CLIP_ALIASES = {
    "openai/clip-vit-large-patch14": "ViT-L-14:openai",
    "openai/clip-vit-base-patch32": "ViT-B-32:openai",
    "openai/clip-vit-base-patch16": "ViT-B-16:openai",
}


def tiny_opt_config():
    from transformers import OPTConfig

    # GPT-2 BPE (50257 tokens) + [RET]; OPT pads its vocabulary to 50272 like the real models.
    return OPTConfig(
        vocab_size=50272, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
        num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64,
        pad_token_id=50256, bos_token_id=50256, eos_token_id=50256,
        dropout=0.0, attention_dropout=0.0,
    )


# Published architectures of the OPT family (the `config.json` of each facebook/opt-* repo), so
# the paper's model can be built on the meta device (pruning, converting, counting parameters)
# on a machine without a model hub. (hidden, layers, heads, ffn, word_embed_proj_dim)
OPT_SHAPES = {
    "facebook/opt-125m": (768, 12, 12, 3072, 768),
    "facebook/opt-350m": (1024, 24, 16, 4096, 512),
    "facebook/opt-1.3b": (2048, 24, 32, 8192, 2048),
    "facebook/opt-2.7b": (2560, 32, 32, 10240, 2560),
    "facebook/opt-6.7b": (4096, 32, 32, 16384, 4096),
    "facebook/opt-13b": (5120, 40, 40, 20480, 5120),
    "facebook/opt-30b": (7168, 48, 56, 28672, 7168),
}


def llm_config(name: str):
    """The transformers config of an LLM identifier: the OPT table above for known OPT ids,
    else `AutoConfig` (a local folder, the hub cache, or the hub)."""
    if name in OPT_SHAPES:
        from transformers import OPTConfig

        hidden, layers, heads, ffn, proj = OPT_SHAPES[name]
        return OPTConfig(vocab_size=50272, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, ffn_dim=ffn, word_embed_proj_dim=proj,
                         max_position_embeddings=2048, do_layer_norm_before=name != "facebook/opt-350m",
                         pad_token_id=1, bos_token_id=2, eos_token_id=2, dropout=0.1)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name)


def load_llm(name: str, dtype: str = "fp32", weights: bool = True,
             device: torch.device | str | None = None) -> nn.Module:
    """A frozen causal LM by identifier (see module docstring).

    weights=False builds the architecture only (use under `torch.device("meta")` to check
    shapes without loading gigabytes). device: where the hub/folder weights load, straight
    onto it (no full copy in host RAM per rank: 4 ranks of OPT-6.7B would otherwise hold
    ~4 x 13 GB of host memory at once while starting); None is the CPU.

    Every device takes the same `from_pretrained` arguments (a `device_map`, which needs
    `accelerate`, a core dependency): a CPU run and its tests then fail the way a GPU run
    would if that path broke, instead of a GPU-only branch failing first on the cluster.
    """
    torch_dtype = DTYPES[dtype]
    if name == "tiny-opt":
        from transformers import OPTForCausalLM

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(BUILTIN_SEED)
            llm = OPTForCausalLM(tiny_opt_config())
        llm = llm.to(torch_dtype)
    elif not weights:
        from transformers import AutoModelForCausalLM

        llm = AutoModelForCausalLM.from_config(llm_config(name), dtype=torch_dtype)
    else:
        from transformers import AutoModelForCausalLM

        logger.info("Loading LLM %s (%s)", name, dtype)
        device = torch.device(device if device is not None else "cpu")
        llm = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, device_map={"": str(device)})
    return freeze(llm)


def compile_llm(llm: nn.Module) -> nn.Module:
    """`torch.compile` each decoder block of a frozen causal LM, in place (`--compile`).

    Block by block rather than the whole forward: the model's mask building and its key/value
    cache (the retrieval pass's prefix) stay eager, so they cannot break the compiled graphs,
    and the blocks share one compiled code object. Any architecture whose blocks sit in one
    `ModuleList` of `num_hidden_layers` entries (OPT, Llama, ...)."""
    n = llm.config.num_hidden_layers
    blocks = next((m for m in llm.modules() if isinstance(m, nn.ModuleList) and len(m) == n), None)
    if blocks is None:
        raise ValueError(f"--compile: no list of {n} decoder blocks found in {type(llm).__name__}")
    for block in blocks:
        block.compile(dynamic=True)  # batch and caption lengths vary from step to step
    return llm


# ---------------------------------------------------------------------- encoders


class OpenCLIPEncoders(FrozenEncoders):
    """Both towers of an open_clip CLIP model."""

    def __init__(self, clip: nn.Module, preprocess, tokenizer, identity: str):
        super().__init__()
        self.clip = freeze(clip)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.identity = identity
        visual = clip.visual
        self.image_embed_dim = int(clip.text_projection.shape[-1]) if _has_text_proj(clip) else _out_dim(clip)
        proj = getattr(visual, "proj", None)
        self.image_pooled_dim = int(proj.shape[0]) if isinstance(proj, torch.Tensor) else self.image_embed_dim
        self.text_embed_dim = self.image_embed_dim

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> ImageFeatures:
        visual = self.clip.visual
        pixels = pixels.to(self.device, next(visual.parameters()).dtype)
        proj = getattr(visual, "proj", None)
        if not isinstance(proj, torch.Tensor):  # e.g. ModifiedResNet: projection is inside attnpool
            embed = visual(pixels)
            return ImageFeatures(embed, embed)
        # Run the tower without its final projection to get the pre-projection pooled feature,
        # then project once ourselves: one forward pass yields both features.
        visual.proj = None
        try:
            pooled = visual(pixels)
        finally:
            visual.proj = proj
        return ImageFeatures(pooled, pooled @ proj)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.clip.encode_text(tokens)


def _has_text_proj(clip: nn.Module) -> bool:
    return isinstance(getattr(clip, "text_projection", None), torch.Tensor)


def _out_dim(clip: nn.Module) -> int:
    return int(clip.visual.output_dim)


TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@dataclass(frozen=True)
class OpenCLIPSpec:
    """An open_clip model resolved from an identifier, with the settings its weights need.

    quick_gelu: OpenAI's CLIP weights were trained with QuickGELU, but open_clip's architecture
    configs (``ViT-L-14``, ``ViT-B-32``, ...) build GELU; the pretrained tag's config says which
    (``quick_gelu=True``) and open_clip only warns on a mismatch. Building with the wrong
    activation silently shifts every frozen feature, so it is part of the identity.
    """

    model_name: str
    pretrained: str | None
    quick_gelu: bool
    tag_cfg: dict

    @property
    def identity(self) -> str:
        return f"open_clip:{self.model_name}:{self.pretrained}" + ("|quick_gelu" if self.quick_gelu else "")


def resolve_open_clip(visual_model: str) -> OpenCLIPSpec:
    """NAME[:tag], a seed alias, a local weights file or a schema (`local-dir:`, `hf-hub:`)."""
    from open_clip.pretrained import get_pretrained_cfg

    model_name, pretrained = _parse_clip_name(visual_model)
    # A known tag's config (no download); {} for local weight files and schemas, whose own
    # config decides the activation.
    tag_cfg = dict(get_pretrained_cfg(model_name, pretrained)) if pretrained else {}
    quick_gelu = bool(tag_cfg.get("quick_gelu", False)) or model_name.endswith("-quickgelu")
    return OpenCLIPSpec(model_name, pretrained, quick_gelu, tag_cfg)


def _create_open_clip(spec: OpenCLIPSpec, weights: bool):
    """(clip, eval preprocess). Without weights: the same architecture and preprocessing as the
    tagged model, built on the current default device (``meta`` under `UniMuR.skeleton`)."""
    import open_clip

    if weights:
        clip, _, preprocess = open_clip.create_model_and_transforms(
            spec.model_name, pretrained=spec.pretrained, force_quick_gelu=spec.quick_gelu)
        return clip, preprocess
    # open_clip downloads a tag's weights even with load_weights=False, so pass no tag and
    # give its preprocessing explicitly; `device` keeps a meta build on meta (open_clip
    # otherwise moves the model to the CPU, which fails for meta tensors).
    cfg = spec.tag_cfg
    clip, _, preprocess = open_clip.create_model_and_transforms(
        spec.model_name, pretrained=None, force_quick_gelu=spec.quick_gelu,
        device=torch.get_default_device(), image_mean=cfg.get("mean"), image_std=cfg.get("std"),
        image_interpolation=cfg.get("interpolation"), image_resize_mode=cfg.get("resize_mode"))
    return clip, preprocess


def _parse_clip_name(name: str) -> tuple[str, str | None]:
    name = CLIP_ALIASES.get(name, name)
    if name.startswith(("local-dir:", "hf-hub:")):
        return name, None
    model, _, pretrained = name.partition(":")
    return model, (pretrained or None)


def load_encoders(visual_model: str, text_model: str | None = None, dtype: str = "fp32",
                  weights: bool = True) -> FrozenEncoders:
    """The frozen image/text encoders by identifier (see module docstring); weights=False
    builds the architecture only."""
    if text_model is not None:
        raise ValueError(
            f"text_model={text_model!r}: separate text encoders are not available in this build; "
            "leave text_model unset to use the CLIP text tower"
        )
    import open_clip
    from open_clip.transform import image_transform

    if visual_model == "tiny-clip":
        from open_clip.model import CLIP

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(BUILTIN_SEED)
            clip = CLIP(**TINY_CLIP_CFG)
        size = TINY_CLIP_CFG["vision_cfg"]["image_size"]
        preprocess = image_transform(size, is_train=False)
        tokenizer = open_clip.get_tokenizer("ViT-B-32")
        identity = f"tiny-clip:seed{BUILTIN_SEED}"
    else:
        spec = resolve_open_clip(visual_model)
        logger.info("Loading open_clip %s (pretrained=%s, quick_gelu=%s)", spec.model_name, spec.pretrained,
                    spec.quick_gelu)
        clip, preprocess = _create_open_clip(spec, weights)
        tokenizer = open_clip.get_tokenizer(spec.model_name)
        identity = spec.identity
    clip = clip.to(DTYPES[dtype])
    identity += f"|{_describe_preprocess(preprocess)}"
    return OpenCLIPEncoders(clip, preprocess, tokenizer, identity)


def _describe_preprocess(preprocess) -> str:
    """A stable text for the preprocessing pipeline (part of the feature-cache key)."""
    return repr(preprocess).replace("\n", " ")


def square_input_size(preprocess) -> int:
    """The square input size of an encoder: the centre crop of its torchvision-style
    preprocessing (nested Compose allowed)."""
    for t in getattr(preprocess, "transforms", []):
        if type(t).__name__ == "CenterCrop":
            h, w = (t.size, t.size) if isinstance(t.size, int) else tuple(t.size)
            if h == w:
                return int(h)
        elif hasattr(t, "transforms"):
            try:
                return square_input_size(t)
            except ValueError:
                continue
    raise ValueError(f"no square centre crop in the encoder's preprocessing {preprocess!r}")
