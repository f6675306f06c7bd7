"""Train UniMuR: parse flags, set up processes and logging, build the trainer, train.

The seed README's command works as written (see README.md); the command itself is
`unimur.commands.entry_points.train` (also installed as `unimur-train`), the loop lives in
`unimur/train/trainer.py`, process launch in `unimur/train/launch.py`. `--dry-run` prints the memory plan.
Bad inputs, a run folder in use or holding an earlier run, or a backbone that cannot be loaded
end in one `error: ...` line.
"""
import sys

from unimur.commands.entry_points import train
from unimur.errors import run_cli


def main(argv=None):
    return train(argv, prog="main.py")


if __name__ == "__main__":
    sys.exit(run_cli(main))  # expected failures: one `error: ...` line (UNIMUR_TRACEBACK=1: traceback)
