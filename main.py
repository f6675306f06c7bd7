"""Train UniMuR: parse flags, set up processes and logging, build the trainer, train.

The seed README's command works as written (see README.md); the loop lives in
`unimur/trainer.py`, process launch in `unimur/launch.py`.
"""
import sys

from unimur.cli import parse_args
from unimur.launch import launch


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args, cfg = parse_args(argv)
    return launch(args, cfg, ["main.py", *argv])


if __name__ == "__main__":
    main()
