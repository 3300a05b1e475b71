"""Where verbs write: the one place that decides whether an output path may be used, so nothing of
the user's is overwritten or lost.

    target = check_output(out, inputs=[model, adapter], overwrite=overwrite)
    with written_into(target) as tmp:
        save(model, tokenizer, tmp)          # renamed to `target` only when this block completes

The rule, for every verb that writes a directory or a file:
- a target that exists and is not empty is refused (named, with what it holds), unless it is this
  verb's own resumable work (`own`) or `--overwrite true` asks to replace it;
- a target equal to an input, inside one, or holding one is refused, even with --overwrite;
- a target under a file, or in a directory this process cannot write, is refused before any work;
- the output is written under a temporary name beside the target and renamed into place when it
  is complete, so an interrupted write leaves the old contents (or nothing) and a hidden folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Callable, Iterable, Iterator

from mightylm.errors import OutputError


def check_output(out: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = (), overwrite: bool = False,
                 own: Callable[[Path], bool] | None = None, option: str = "--out", replace_hint: bool = True) -> Path:
    """`out` as a Path if it may be written; raises OutputError naming it and saying what to do otherwise
    (`replace_hint`: whether to mention --overwrite, for verbs where it replaces the whole target)."""
    target = Path(out)
    resolved = target.resolve()
    for given in inputs:
        if given is None or not Path(given).exists():
            continue  # embedded model names and corpora are not paths
        source = Path(given).resolve()
        if resolved == source or source in resolved.parents:
            raise OutputError(f"{option} {target} is the input {given} or inside it; writing there would destroy it. "
                              f"Choose another {option}")
        if resolved in source.parents:
            raise OutputError(f"{option} {target} holds the input {given}; choose another {option}")
    _check_writable(target, option)
    if target.exists() and not overwrite:
        if not target.is_dir():
            raise OutputError(f"{option} {target}: a file of that name exists; choose another {option} or pass "
                              "--overwrite true to replace it")
        held = sorted(p.name for p in target.iterdir())
        if held and not (own is not None and own(target)):
            shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
            raise OutputError(f"{option} {target}: already exists and is not empty (it holds {shown}); choose another "
                              f"{option}" + (" or pass --overwrite true to replace it" if replace_hint else ""))
    return target


def _check_writable(target: Path, option: str) -> None:
    """Refuse a target under a file or in a directory we cannot write, naming the part that is in the way."""
    for parent in [target, *target.parents]:
        if parent.exists():
            break
    else:
        return
    if parent != target and not parent.is_dir():
        raise OutputError(f"{option} {target}: {parent} is a file, not a directory")
    here = parent if parent.is_dir() else parent.parent
    if not os.access(here, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {target}: {here} is not writable by this user; choose another {option}")


@contextmanager
def written_into(target: Path) -> Iterator[Path]:
    """A new temporary directory beside `target`; renamed to `target` when the block completes (an old target,
    which check_output let through only with --overwrite, is removed only then). On an error or interruption
    the temporary directory is removed and `target` is as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    old = None
    try:
        yield tmp
        if target.exists():
            if target.is_dir() and not any(target.iterdir()):
                target.rmdir()
            else:
                old = target.with_name(f".{target.name}.replaced-{os.getpid()}")
                os.replace(target, old)
        os.replace(tmp, target)
    finally:
        remove(tmp, quiet=True)
        if old is not None:
            remove(old, quiet=True)


def remove(path: Path, *, quiet: bool = False) -> None:
    """Delete a file or a directory tree, if there is one (what --overwrite replaces, or a temporary leftover);
    `quiet` ignores errors (cleanup that must not hide the error being raised)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=quiet)
        return
    with suppress(OSError) if quiet else nullcontext():
        path.unlink(missing_ok=True)
