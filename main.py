"""Train UniMuR: the seed README's command (see README.md), a few lines over
`unimur.commands.train` (also installed as ``unimur-train``). The loop is `unimur/train/trainer.py`,
process launch `unimur/train/launch.py`; ``--dry-run`` prints the memory plan. Bad inputs, a run
folder in use or holding an earlier run, or a backbone that cannot be loaded end in one
``error: ...`` line.
"""
import sys

from unimur.commands.train import train
from unimur.errors import run_cli


def main(argv=None):
    return train(argv, prog="main.py")


if __name__ == "__main__":
    sys.exit(run_cli(main))  # expected failures: one `error: ...` line (UNIMUR_TRACEBACK=1: traceback)
