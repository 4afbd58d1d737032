"""A run directory's life beyond training itself: one trainer at a time, a fresh start that
loses nothing, a previous run (a Kaggle notebook version's output) brought in."""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path

from cmc_kit.errors import CheckpointError
from cmc_kit.fileio import atomic_write_text
from cmc_kit.runs.checkpoints import has_checkpoint, saved_state
from cmc_kit.runs.files import (CHECKPOINT_DIR, CONFIG_FILE, LOCK_FILE, RUN_OUTPUTS,
                                SET_ASIDE_DIR, damaged_logs)


class RunLock:
    """One trainer per run directory: an exclusive `fcntl` lock on RUN/.trainer.lock while the
    block runs. The file names the holder (pid, host, start time) for the message a second
    trainer gets at once. The kernel drops the lock when its process dies, so a lock left by a
    killed trainer is taken over by the next start. Re-entrant within one process."""

    _held: dict[str, list] = {}  # resolved path -> [file descriptor, depth, made the folder]

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE

    def __enter__(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks here; training still works
            return self
        key = str(self.path.resolve())
        if key in RunLock._held:
            RunLock._held[key][1] += 1
            return self
        made_folder = not self.run_dir.exists()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise CheckpointError(
                f"{self.run_dir} cannot be written ({err.strerror}): training keeps its "
                "checkpoints and logs there. Give a writable run directory (--run / RUN_DIR; on "
                "Kaggle under /kaggle/working) or fix the folder's permissions.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "unknown process"
            os.close(fd)
            raise CheckpointError(
                f"{self.run_dir} is being trained by another process ({holder}). Wait for it to "
                "finish or stop it, or train another run directory (--run / RUN_DIR): two "
                "trainers would write the same checkpoints and logs.") from None
        import socket
        import time

        try:  # who holds it, for the message; the lock itself does not depend on this
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        except OSError:
            pass
        RunLock._held[key] = [fd, 1, made_folder]
        return self

    def __exit__(self, *exc) -> None:
        key = str(self.path.resolve())
        if key not in RunLock._held:
            return
        RunLock._held[key][1] -= 1
        if RunLock._held[key][1] == 0:
            fd, _, made_folder = RunLock._held.pop(key)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing drops the lock
            if made_folder and [p.name for p in self.run_dir.iterdir()] == [LOCK_FILE]:
                shutil.rmtree(self.run_dir)  # nothing came of it: leave no folder behind


class FreshStart:
    """Moves a run's outputs into RUN/.before-fresh (a rename: nothing is copied), then either
    puts them back (`put_back`: the new run failed its checks) or deletes them (`discard`)."""

    def __init__(self, run_dir: str | os.PathLike, moved: list[str]):
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / SET_ASIDE_DIR
        self.moved = moved

    @classmethod
    def set_aside(cls, run_dir: str | os.PathLike, names=RUN_OUTPUTS) -> "FreshStart":
        run_dir = Path(run_dir)
        folder = run_dir / SET_ASIDE_DIR
        # Still here only next to a newer run's checkpoint (else recovered): superseded.
        shutil.rmtree(folder, ignore_errors=True)
        moved = [name for name in (*names, *damaged_logs(run_dir)) if (run_dir / name).exists()]
        if moved:
            folder.mkdir(parents=True)
            for name in moved:
                os.replace(run_dir / name, folder / name)
        return cls(run_dir, moved)

    @classmethod
    def left_behind(cls, run_dir: str | os.PathLike) -> "FreshStart":
        """The outputs an interrupted process had set aside, to put back."""
        folder = Path(run_dir) / SET_ASIDE_DIR
        return cls(run_dir, [child.name for child in folder.iterdir()])

    def put_back(self) -> None:
        for name in self.moved:
            target = self.run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            os.replace(self.folder / name, target)
        self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def recover_set_aside(run_dir: str | os.PathLike) -> None:
    """Puts back a run that a fresh start had moved aside when its process was killed before
    the new run's first checkpoint (the new run's files, if any, give way)."""
    folder = Path(run_dir) / SET_ASIDE_DIR
    if not folder.is_dir() or has_checkpoint(run_dir):
        return
    aside = FreshStart.left_behind(run_dir)
    if aside.moved:
        warnings.warn(f"Restoring {run_dir} from {folder}: a fresh start was interrupted before "
                      "its first checkpoint.", stacklevel=3)
    aside.put_back()


def refuse_fresh_with_resume_from(fresh: bool, resume_from) -> None:
    """`fresh` starts over, `resume_from` continues another run: asking for both is a mistake.

    (`fresh` alone also ignores a previous output attached on Kaggle: starting over must not
    quietly continue the attached run.)
    """
    if fresh and resume_from is not None:
        raise CheckpointError(f"fresh=True (--fresh) starts the run over, but resume_from "
                              f"(--resume-from) {resume_from} asks to continue that run. "
                              "Drop one of the two.")


def bring_in_previous_run(run: str | os.PathLike, resume_from: str | os.PathLike | None = None,
                          *, fresh: bool = False,
                          input_root: str | os.PathLike | None = None) -> Path | None:
    """Copies a previous run into the writable `run`, unless `run` already holds a checkpoint.

    `resume_from` names the previous run (a run directory at or below it); None looks for a
    previous Kaggle notebook version's output of the same name attached under `input_root`
    (default: /kaggle/input on Kaggle, nowhere elsewhere), unless `fresh`. Returns the run
    directory copied from, or None when nothing was copied.
    """
    from cmc_kit import kaggle

    run = Path(run)
    if not fresh:  # a run moved aside by an interrupted fresh start is not "empty"
        recover_set_aside(run)
    if has_checkpoint(run):
        if resume_from is not None:
            warnings.warn(
                f"{run} already holds a checkpoint (step {saved_state(run).get('step', 'unknown')}"
                f"), so {resume_from} (--resume-from / RESUME_FROM) is not copied in: {run} "
                f"continues. To continue {resume_from} instead, give another run directory "
                "(--run / RUN_DIR).", stacklevel=2)
        return None
    if resume_from is not None:
        source = find_run(Path(resume_from))
        if source is None:
            raise CheckpointError(
                f"No run directory ({CONFIG_FILE} + {CHECKPOINT_DIR}/) found under {resume_from}. "
                "Attach the previous notebook version's output, or leave out --resume-from "
                "(RESUME_FROM = None in 03_resume).")
    elif fresh:
        return None
    else:
        source = kaggle.find_previous_output(run, input_root, is_run=is_run_dir)
        if source is None:
            return None
    if source.resolve() != run.resolve():
        _copy_run(source, run)
    return source


def is_run_dir(folder: str | os.PathLike) -> bool:
    """A folder holding a run's config.json and checkpoints/ (not necessarily a checkpoint)."""
    folder = Path(folder)
    return (folder / CONFIG_FILE).is_file() and (folder / CHECKPOINT_DIR).is_dir()


def find_run(source: Path) -> Path | None:
    """The run directory at or below `source` (the first by path), or None."""
    if is_run_dir(source):
        return source
    return next((path.parent for path in sorted(source.rglob(CONFIG_FILE))
                 if is_run_dir(path.parent)), None)


def _copy_run(previous: Path, run_dir: Path) -> None:
    """Copies a run directory (e.g. from read-only /kaggle/input) to `run_dir`, through a
    temporary folder, and points the checkpoint state at the new place."""
    tmp = run_dir.with_name(run_dir.name + ".importing")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(previous, tmp)
    if run_dir.exists():
        for child in tmp.iterdir():
            target = run_dir / child.name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            shutil.move(str(child), str(target))
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, run_dir)
    # CheckpointManager stores absolute paths: point them at the new location.
    state_file = run_dir / CHECKPOINT_DIR / "checkpoint"
    if state_file.exists():
        text = state_file.read_text()
        text = text.replace(str(previous / CHECKPOINT_DIR), str(run_dir / CHECKPOINT_DIR))
        atomic_write_text(state_file, text)
