"""Checkpoints: one file per save, written to a temp name and renamed, loaded with weights_only.

A checkpoint is a dict with `format`, `kind` (which policy or trainer wrote it), `config` (plain
containers), `step`, `rng` (see `rng_state`) and whatever state dicts the writer adds. Only tensors,
numbers, strings, lists, tuples and dicts go in, so `torch.load(weights_only=True)` reads it back
and a checkpoint can never run code on load.
"""

from __future__ import annotations

import errno
import glob
import io
import json
import os
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch

from robodistill.errors import CutShort, UserError

FORMAT = "robodistill-checkpoint-v1"


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Write a file through `write(f)` under a temp name beside it, then rename it into place: a crash
    mid-write leaves the previous file intact (checkpoints, and the files a resumed run reads). A full disk ends the
    run in one line that says so."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # open(), not mkstemp: the umask's mode, not 0600
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        raise_if_no_room(err, path, f"{path.name} as it was is kept" if path.exists() else f"there is no {path.name} yet")
        raise
    remove_orphaned(path.parent, f".{path.name}.")
    return path


def raise_if_no_room(err: BaseException, path: Path, kept: str) -> None:
    """A write of `path` that failed for lack of space (or over the file-size limit) ends the run in one line naming
    it, what is `kept` and the fix; any other error is left to the caller to re-raise."""
    if not isinstance(err, OSError) or err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return
    fix = "raise the file-size limit (ulimit -f)" if err.errno == errno.EFBIG else "make room on that disk, or run in a folder on another one"
    raise CutShort(f"could not write {path}: {os.strerror(err.errno)} ({kept}); {fix}") from err


def remove_orphaned(folder: Path, prefix: str) -> None:
    """Remove the temp files and folders in `folder` named `<prefix><pid>...` whose process is gone: one killed
    mid-write (kill -9, out of memory) had no chance to remove its own."""
    for stale in folder.glob(f"{glob.escape(prefix)}*"):
        pid = re.match(r"\d+", stale.name[len(prefix):])
        if pid and not _alive(int(pid.group())):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """`obj` as indented JSON, written atomically (see `write_atomic`)."""
    return write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def save(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write `payload` atomically (see `write_atomic`)."""
    # Serialised in memory first: torch.save into a file that runs out of space reports "[enforce fail at
    # inline_container.cc] unexpected pos", not the OSError that says the disk is full.
    data = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, data)
    return write_atomic(path, lambda f: f.write(data.getbuffer()))


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save`; errors name the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        if not zipfile.is_zipfile(path):  # torch.save writes zip archives: this is another kind of file, or cut short
            raise UserError(f"checkpoint '{path}' cannot be read: it is not a torch checkpoint, or it is truncated") from err
        if "policy.pth" in zipfile.ZipFile(path).namelist():
            raise UserError(f"'{path}' is a stable-baselines3 zip (an rpd student), not a robodistill checkpoint: "
                            "it goes to eval policy=, export ckpt= or rpd resume_from=") from err
        first = (str(err).strip().splitlines() or [""])[0]  # torch's own text runs on for lines
        raise UserError(f"checkpoint '{path}' cannot be read ({type(err).__name__}: {first}); is it truncated or not a torch file?") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"'{path}' is not a robodistill checkpoint (expected format {FORMAT})")
    return payload


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as weights_only-safe values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "cached": cached},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured, so a resumed run draws the same numbers."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # one state per GPU that was visible where it was saved: those of GPUs not here are left (set_rng_state_all
        # would ask torch.cuda.default_generators, one per GPU here, for them: "tuple index out of range")
        for index, cuda in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda, index)
