"""VisDial 1.0 val, dialogue-to-image retrieval (paper Table 3; SPEC section 4).

    python evals/eval_visdial.py --help

The seed README's command, kept as written: the command is `unimur.commands.eval_visdial` (also
installed as ``unimur-eval-visdial``).
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the checkout, not evals/, comes first on sys.path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from unimur.commands.eval_visdial import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
