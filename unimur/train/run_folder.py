"""The run folder (`<log-base-dir>/<exp_name>/`): who may write it, and the record it keeps.

Nothing in a run folder is lost by accident:
  * a new run (no ``--resume``) refuses a folder that holds an earlier run's checkpoints unless
    ``--overwrite`` says to replace them;
  * a trainer holds ``run.lock`` (an ``flock``, naming its process id) for its whole life, so a
    second trainer on the same folder refuses. The kernel drops an ``flock`` when its process
    dies, even by SIGKILL, so a killed run never leaves a lock that blocks ``--resume`` (on NFS,
    Linux maps ``flock`` onto the server's POSIX locks, so it holds across nodes too).
    (``filelock`` would do the locking too, but it truncates the file it locks on every
    attempt, which would erase the holder's pid that the refusal message names.)

Next to the checkpoints, metrics and `train.log`, the folder records what produced them:
`config.json`, `command.txt`, `params.json`, `param_count.txt` (trainable and frozen
parameters per module) and `git_info.txt` (commit, branch, dirty or not, diff stat).
"""
from __future__ import annotations

import fcntl
import logging
import os
import socket
import subprocess
import time
from collections import defaultdict
from pathlib import Path

from torch import nn

from unimur.errors import RunFolderError

logger = logging.getLogger(__name__)

LOCK = "run.lock"
CHECKPOINTS = "ckpt*.pth.tar"
# What a run writes as it goes; --overwrite removes the earlier run's copies of these.
RUN_OUTPUTS = (CHECKPOINTS, "metrics.jsonl", "events.out.tfevents.*", "train.log")


def checkpoints_in(run_dir: Path) -> list[str]:
    return sorted(p.name for p in Path(run_dir).glob(CHECKPOINTS))


def check_new_run(run_dir: Path, resume: str | None, overwrite: bool) -> None:
    """Refuse to start a new run over an earlier run's checkpoints (unless ``overwrite``)."""
    if resume and overwrite:
        raise RunFolderError("--overwrite starts the run over and --resume continues it: pass one of them")
    if resume or overwrite:
        return
    found = checkpoints_in(run_dir)
    if found:
        raise RunFolderError(
            f"{run_dir} already holds checkpoints of an earlier run ({', '.join(found)}); pass "
            f"--resume latest to continue it, another --exp_name to start a new run, or "
            f"--overwrite to replace it")


def clear_previous_run(run_dir: Path) -> list[str]:
    """--overwrite: delete the earlier run's checkpoints, metrics and log (under the lock)."""
    removed = []
    for pattern in RUN_OUTPUTS:
        for p in sorted(Path(run_dir).glob(pattern)):
            p.unlink()
            removed.append(p.name)
    if removed:
        logger.warning("--overwrite: removed the earlier run's %s from %s", ", ".join(removed), run_dir)
    return removed


class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/run.lock``, held until :meth:`release` or exit."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock (the folder must exist) or raise RunFolderError naming the holder."""
        if self.held:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise _in_use(self.path.parent, holder) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def check_not_locked(run_dir: Path) -> None:
    """Raise RunFolderError if a live trainer holds ``run_dir`` (creates nothing)."""
    path = Path(run_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(Path(run_dir), _read(fd)) from None
    finally:
        os.close(fd)  # closing drops the shared lock, if we got it


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 200).decode(errors="replace").strip() or "unknown process"


def _in_use(run_dir: Path, holder: str) -> RunFolderError:
    return RunFolderError(f"{run_dir} is in use by another trainer ({holder}; lock {run_dir / LOCK}); "
                          f"wait for it to finish or stop it, or pick another --exp_name")


# ----------------------------------------------------------------------------------------------
# The run's record
# ----------------------------------------------------------------------------------------------


def param_count_table(model: nn.Module) -> str:
    """Trainable and frozen parameters per top-level module, as an aligned text table."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    dtypes: dict[str, set[str]] = defaultdict(set)
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        counts[top][0 if p.requires_grad else 1] += p.numel()
        dtypes[top].add(str(p.dtype).removeprefix("torch."))
    rows = [(m, t, f, ",".join(sorted(dtypes[m]))) for m, (t, f) in counts.items()]
    rows.sort(key=lambda r: (r[1] == 0, r[0]))  # trainable modules first
    trainable, frozen = sum(r[1] for r in rows), sum(r[2] for r in rows)
    width = max([len("module"), *(len(r[0]) for r in rows)]) + 2
    line = lambda m, t, f, d: f"{m:<{width}}{t:>15,}{f:>17,}  {d}".rstrip()  # noqa: E731
    out = [f"{'module':<{width}}{'trainable':>15}{'frozen':>17}  dtype"]
    out += [line(*r) for r in rows]
    out.append(line("total", trainable, frozen, ""))
    share = 100.0 * trainable / max(1, trainable + frozen)
    out.append(f"trainable share: {share:.4f}% of {trainable + frozen:,} parameters")
    return "\n".join(out) + "\n"


def git_info(root: Path | None = None) -> str:
    """Commit, branch, dirty or not (and the diff stat when dirty) of the code's checkout."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              check=True, timeout=30).stdout.rstrip("\n")

    try:
        top = git("rev-parse", "--show-toplevel")
    except (OSError, subprocess.SubprocessError):  # no git, or not inside a work tree
        return f"not a git checkout ({root})\n"
    try:
        commit = git("rev-parse", "HEAD")
        branch = git("rev-parse", "--abbrev-ref", "HEAD")  # "HEAD" when detached
    except subprocess.SubprocessError:  # a repository without commits
        commit = branch = None
    try:
        return _git_state(git, top, commit, branch)
    except subprocess.SubprocessError as e:  # e.g. git refuses a checkout owned by another user
        return f"checkout: {top}\ncommit: {commit}\nbranch: {branch}\nstate: unknown (git failed: {e})\n"


def _git_state(git, top: str, commit: str | None, branch: str | None) -> str:
    changed = git("status", "--porcelain", "--untracked-files=no")
    untracked = sum(line.startswith("?? ") for line in
                    git("status", "--porcelain", "--untracked-files=normal").splitlines())
    lines = [f"checkout: {top}", f"commit: {commit or 'none (no commit yet)'}", f"branch: {branch or 'none'}",
             f"state: {'dirty (uncommitted changes to tracked files)' if changed else 'clean'}",
             f"untracked files: {untracked}"]
    if changed:
        stat = git("diff", "--stat", "HEAD") if commit else changed
        lines += ["diff stat against the commit:", stat]
    return "\n".join(lines) + "\n"


def write_record(run_dir: Path, model: nn.Module) -> None:
    """param_count.txt and git_info.txt (rank 0; the folder exists)."""
    (Path(run_dir) / "param_count.txt").write_text(param_count_table(model))
    (Path(run_dir) / "git_info.txt").write_text(git_info())
