"""Train UniMuR: parse flags, set up processes and logging, build the trainer, train.

The seed README's command works as written (see README.md); the loop lives in
`unimur/trainer.py`, process launch in `unimur/launch.py`. Bad inputs, a run folder in use or
holding an earlier run, or a backbone that cannot be loaded end in one `error: ...` line.
"""
import sys

from unimur.cli import parse_args
from unimur.errors import run_cli
from unimur.launch import launch


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args, cfg = parse_args(argv)
    return launch(args, cfg, ["main.py", *argv])


if __name__ == "__main__":
    sys.exit(run_cli(main))  # expected failures: one `error: ...` line (UNIMUR_TRACEBACK=1: traceback)
