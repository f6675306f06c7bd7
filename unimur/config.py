"""One config tree (model / data / train), serialisable to JSON and back losslessly.

`ModelConfig` alone rebuilds a model: it is stored with every checkpoint and with a pruned
model. Unknown keys are an error (a typo must not silently fall back to a default).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

METHODS = ("unimur", "fromage")


@dataclass
class ModelConfig:
    method: str = "unimur"
    """`unimur` (dual alignment: VM + TM) or `fromage` (FROMAGe's objective: W_v only, 256-d)."""
    llm: str = "facebook/opt-6.7b"
    """Frozen causal LM: hub id, local folder, `tiny-opt` (tests) or `smollm2-135m` (offline
    demo) (seed flag --opt-version)."""
    visual_model: str = "openai/clip-vit-large-patch14"
    """Frozen CLIP (open_clip NAME[:pretrained], seed alias, `tiny-clip`), or `efficientnet-lite0`
    (offline demo, with text_model=all-minilm-l6-v2 and target_proj=linear)."""
    text_model: str | None = None
    """Separate frozen text encoder (`all-minilm-l6-v2`); None uses CLIP's text tower (CLIP-T)."""
    llm_dtype: str = "fp32"
    """Storage dtype of the frozen LLM (fp32|bf16|fp16); trainable layers stay fp32."""
    encoder_dtype: str = "fp32"
    """Storage dtype of the frozen image/text encoders."""
    n_visual_tokens: int = 1
    """k: LLM input embeddings produced per image by W_cap."""
    visual_feature: str = "pooled"
    """CLIP-V feature fed to W_cap (and W_v): `pooled` pre-projection (FROMAGe) or `embed`."""
    target_proj: str = "none"
    """`none`: align to CLIP's joint space; `linear`: W_v, W_t to shared_emb_dim."""
    shared_emb_dim: int = 256
    """Retrieval space size when target_proj=linear."""
    ret_renorm: bool = True
    """Rescale the [RET] embedding to the mean input-embedding norm after each step (FROMAGe)."""
    text_emb_layers: tuple[int, ...] = (-1,)
    """LLM layers whose [RET] hidden state feeds u: one W_u per layer, outputs summed (FROMAGe's
    --text-emb-layers; -1 = last layer, i = hidden_states[i] of the LLM)."""
    image_embed_dropout_prob: float = 0.0
    """Dropout on W_cap's and W_v's outputs while training (FROMAGe)."""
    text_embed_dropout_prob: float = 0.0
    """Dropout on each W_u output while training (FROMAGe)."""
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100.0)

    def __post_init__(self):
        _check_choice("method", self.method, METHODS)
        _check_choice("target_proj", self.target_proj, ("none", "linear"))
        _check_choice("visual_feature", self.visual_feature, ("pooled", "embed"))
        _check_choice("llm_dtype", self.llm_dtype, ("fp32", "bf16", "fp16"))
        _check_choice("encoder_dtype", self.encoder_dtype, ("fp32", "bf16", "fp16"))
        if self.method == "fromage" and self.target_proj != "linear":
            raise ValueError("method=fromage aligns to W_v(CLIP-V): it needs target_proj=linear")
        if self.n_visual_tokens < 1:
            raise ValueError("n_visual_tokens must be >= 1")
        self.text_emb_layers = tuple(int(i) for i in self.text_emb_layers)
        if not self.text_emb_layers or len(set(self.text_emb_layers)) != len(self.text_emb_layers):
            raise ValueError(f"text_emb_layers={list(self.text_emb_layers)}: give distinct layer indices")
        for name in ("image_embed_dropout_prob", "text_embed_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)}: expected a probability in [0, 1)")


@dataclass
class LossConfig:
    """Weights of L = l_cap*CL + l_vm*VM + l_tm*TM + l_lm*LMret (SPEC section 2)."""

    l_cap: float = 1.0
    l_vm: float = 1.0
    l_tm: float = 1.0
    l_lm: float = 0.0
    gather_grad: str = "exact"
    """Contrastive gradient across ranks: `exact` (the global loss's gradient, identical for 1
    and W processes) or `fromage` (FROMAGe's gather: 1/W of it; on with method=fromage)."""

    def __post_init__(self):
        _check_choice("gather_grad", self.gather_grad, ("exact", "fromage"))


@dataclass
class DataConfig:
    dataset: str = "cc3m"
    val_dataset: str = "cc3m"
    dataset_dir: str = "dataset/"
    """Folder with cc3m_train.tsv / cc3m_val.tsv."""
    image_dir: str = "data/"
    max_len: int = 24
    """Caption length in LLM tokens, [RET] included."""
    image_size: int | None = None
    """FROMAGe's --image-size: checked against the frozen encoder's input size (the encoder's
    own preprocessing decides it); None: not checked."""
    workers: int = 4
    feature_cache: bool = True
    """Precompute frozen CLIP features once (CLIP never changes); False recomputes per step."""
    cache_dir: str | None = None
    """Where cached features live; None: <dataset_dir>/.feature_cache."""
    dataset_format: str = "tsv"
    """`tsv` (cc3m_<split>.tsv + image dir), `img2dataset` (its `files` output folders) or
    `wds` (webdataset .tar shards): see `unimur.data.cc3m_sources`."""
    cache_dtype: str | None = None
    """Storage dtype of cached features (fp16|bf16|fp32); None: bf16 with precision bf16, else fp16."""
    cache_verify: bool = False
    """Re-hash the whole cache file at every start (default: size + mtime + header hash)."""

    def __post_init__(self):
        _check_choice("dataset_format", self.dataset_format, ("tsv", "img2dataset", "wds"))
        if self.cache_dtype is not None:
            _check_choice("cache_dtype", self.cache_dtype, ("fp32", "bf16", "fp16"))


@dataclass
class TrainConfig:
    exp_name: str = "unimur_exp"
    log_base_dir: str = "exp_log/"
    epochs: int = 10
    steps_per_epoch: int = 2000
    val_steps_per_epoch: int = 250
    """Validation batches per evaluation; -1: the whole validation set (FROMAGe's default)."""
    batch_size: int = 180
    """Global batch (split over ranks)."""
    val_batch_size: int | None = None
    """Global validation batch; None: the training batch size (FROMAGe's default)."""
    learning_rate: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    lr_warmup_steps: int = 100
    lr_schedule_step_size: int = 10
    """Epochs between learning-rate decays (FROMAGe's StepLR)."""
    lr_schedule_gamma: float = 0.1
    grad_clip: float = 1.0
    grad_accumulation_steps: int = 1
    precision: str = "bf16"
    seed: int = 42
    print_freq: int = 100
    save_every_steps: int = 0
    """Also write the latest checkpoint every N optimizer steps (0: only at epoch ends)."""
    concat_captions_prob: float = 0.5
    """Per step, the probability that the captioning pass reads pairs of examples as one
    sequence (FROMAGe's default; `unimur.model.packing`)."""
    start_epoch: int = 0
    """Start a new run at this epoch (schedule and data order positioned there; FROMAGe)."""
    compile: bool = False
    """torch.compile the frozen LLM's forward (its effect: benchmarks/bench_train_step.py)."""
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self):
        _check_choice("precision", self.precision, ("fp32", "fp16", "bf16"))
        if self.val_batch_size is None:
            self.val_batch_size = self.batch_size
        if not 0.0 <= self.concat_captions_prob <= 1.0:
            raise ValueError(f"concat_captions_prob={self.concat_captions_prob}: expected a probability")
        if not 0 <= self.start_epoch < max(1, self.epochs):
            raise ValueError(f"start_epoch={self.start_epoch}: expected 0 <= start_epoch < epochs ({self.epochs})")
        if self.val_steps_per_epoch == 0 or self.val_steps_per_epoch < -1:
            raise ValueError(f"val_steps_per_epoch={self.val_steps_per_epoch}: use N >= 1 batches, "
                             "or -1 for the whole validation set")
        self.betas = tuple(self.betas)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        return from_dict(cls, d)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        return cls.from_json(Path(path).read_text())


def fromage_preset(model: ModelConfig, loss: LossConfig) -> tuple[ModelConfig, LossConfig]:
    """FROMAGe's objective in this code: u aligned to W_v(CLIP-V) in 256-d, + CL + LMret, no TM,
    with FROMAGe's cross-rank contrastive gradient."""
    model = dataclasses.replace(model, method="fromage", target_proj="linear", shared_emb_dim=256)
    loss = dataclasses.replace(loss, l_tm=0.0, l_lm=1.0, gather_grad="fromage")
    return model, loss


def from_dict(cls, d: dict[str, Any], path: str = ""):
    """Build dataclass `cls` from a dict, recursing into nested dataclasses; unknown keys raise."""
    if not isinstance(d, dict):
        raise ValueError(f"config{path}: expected an object, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"config{path}: unknown key(s) {unknown}; known: {sorted(names)}")
    hints = get_type_hints(cls)
    kwargs = {}
    for key, value in d.items():
        sub = hints[key]
        if dataclasses.is_dataclass(sub):
            value = from_dict(sub, value, f"{path}.{key}")
        kwargs[key] = value
    return cls(**kwargs)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {choices}")
