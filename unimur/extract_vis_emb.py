"""Embed an image collection once, for retrieval (FROMAGe's cc3m_embeddings, made safe).

    python unimur/extract_vis_emb.py --model-dir unimur_model --image-dir MMDialog/test --output OUT.safetensors

The seed README's command path, kept as written: the command is `unimur.commands.extract_vis_emb` (flags, `--help`).
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: sys.path[0] is unimur/, whose subpackages (data,
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # model, utils...) would shadow top-level modules

from unimur.commands.extract_vis_emb import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())  # expected failures: one `error: ...` line
