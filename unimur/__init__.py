"""UniMuR: unified embeddings for multimodal retrieval via a frozen LLM (Wang et al., EACL 2024).

The public API, imported on first use (``import unimur`` does not load torch)::

    from unimur import UniMuR, Retriever, load_image_embeddings

    model = UniMuR.from_pretrained("unimur_model")          # a pruned model folder
    retriever = Retriever.from_model(model, load_image_embeddings("pool.safetensors"), texts)
    result = retriever.retrieve([["do you have a red star?"]], k=3)[0]

Commands: ``python main.py`` (train), ``python evals/eval_*.py``, ``python -m unimur.commands.retrieve``,
``python -m unimur.commands.app``, ``python -m unimur_demo.pipeline`` (and the ``unimur-*`` console scripts of an
installed package; see README.md).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "UniMuR": "unimur.model.model",                       # the model: frozen LLM + CLIP, trainable maps
    "ModelConfig": "unimur.config",                 # its config (names the frozen backbones)
    "Config": "unimur.config",                      # the full training config tree
    "load_pretrained": "unimur.model.model",              # a pruned model folder -> UniMuR
    "save_pretrained": "unimur.model.pretrained",
    "read_model_config": "unimur.model.pretrained",
    "Retriever": "unimur.inference.retriever",                # top-k images and texts for dialogues
    "RetrievalResult": "unimur.inference.retriever",
    "ModelEmbedder": "unimur.inference.embedder",             # batched embedding of queries, images, texts
    "ImageEmbeddings": "unimur.inference.image_embeddings",         # an image pool's embeddings
    "load_image_embeddings": "unimur.inference.image_embeddings",
    "save_image_embeddings": "unimur.inference.image_embeddings",
    "read_texts": "unimur.inference.pools",                   # a text pool file
    "read_dialogue": "unimur.inference.dialogue",             # a dialogue in MMDialog's turn format
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'unimur' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from unimur.config import Config, ModelConfig  # noqa: F401
    from unimur.inference.dialogue import read_dialogue  # noqa: F401
    from unimur.inference.embedder import ModelEmbedder  # noqa: F401
    from unimur.inference.image_embeddings import ImageEmbeddings, load_image_embeddings, save_image_embeddings  # noqa: F401
    from unimur.inference.pools import read_texts  # noqa: F401
    from unimur.inference.retriever import RetrievalResult, Retriever  # noqa: F401
    from unimur.model.model import UniMuR, load_pretrained  # noqa: F401
    from unimur.model.pretrained import read_model_config, save_pretrained  # noqa: F401
