"""The checkpoints beside the store: where a run's last.ckpt is, how a run id (or a unique
prefix of one) names it, and the one way every checkpoint is read.

Checkpoints hold tensors and plain data only, and every load of one (resume, `analyze`,
`export`, Lightning's own) goes through torch's restricted unpickler (load_checkpoint).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from lab.config import RunConfig, from_dict
from lab.errors import LabError
from lab.records.store import store_dir


def checkpoint_dir(run_id: str) -> Path:
    return store_dir() / "checkpoints" / run_id


def checkpoint_path(run_or_path: str, command: str) -> Path:
    """A checkpoint file, a directory holding last.ckpt, or an MLflow run id or a unique
    prefix of one (its last.ckpt); `command` names the caller in the one-line error when
    there is none."""
    path = Path(run_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        path = path / "last.ckpt"
    else:
        path = checkpoint_dir(run_id_from_prefix(run_or_path, command)) / "last.ckpt"
    if not path.exists():
        raise LabError(f"{command}: no checkpoint at {path} (pass a run id with a checkpoint "
                       "under <store>/checkpoints/<run id>/, or a .ckpt file)")
    return path


def run_id_from_prefix(text: str, command: str) -> str:
    """The run id of the store's checkpoints that starts with `text` (MLflow's ids are 32 hex
    digits; as with git, a unique prefix names one); `text` itself when none does. Several
    matches are a LabError that lists them."""
    text = text.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{1,31}", text):
        return text
    root = store_dir() / "checkpoints"  # checkpoint_dir's parent
    matches = sorted(p.name for p in root.glob(f"{text}*") if (p / "last.ckpt").exists()) \
        if root.is_dir() else []
    if len(matches) > 1:
        shown = ", ".join(matches[:10]) + (f" and {len(matches) - 10} more" if len(matches) > 10
                                           else "")
        raise LabError(f"{command}: run id prefix {text!r} matches {len(matches)} runs with a "
                       f"checkpoint: {shown}; give more characters")
    return matches[0] if matches else text


def load_checkpoint(path: Path, command: str, mmap: bool = False) -> dict:
    """A checkpoint file read with torch's restricted unpickler (`weights_only=True`): it
    rebuilds tensors and plain data (dicts, lists, tuples, strings, numbers, booleans, None)
    and refuses every other object before creating it, so loading runs no code from the file.
    The lab writes nothing else into a checkpoint (the config is a plain dict; the callbacks'
    states are lists of numbers), so it allow-lists no further type. A file that needs more,
    or is no checkpoint at all, is one LabError line naming `command`. `mmap`: tensors are
    mapped, not read (for a caller that needs only the plain data)."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # nothing was created from the file but plain data
        needed = _unsafe_globals(path, err)
        if needed:
            raise LabError(f"{command}: {path} refused: loading it would create "
                           f"{', '.join(needed[:5])}, not only tensors and plain data (a gatelab "
                           "checkpoint holds nothing else; such a file can run code when "
                           "loaded)") from None
        raise LabError(f"{command}: {path} is not a gatelab training checkpoint "
                       f"({type(err).__name__}: {_first_line(err)})") from None
    if not isinstance(raw, dict):
        raise LabError(f"{command}: {path} is not a gatelab training checkpoint "
                       f"(it holds a {type(raw).__name__}, not a dict)")
    return raw


def _unsafe_globals(path: Path, err: Exception) -> list[str]:
    """The objects beyond plain data that a refused file asks for (`posix.system`), read
    from its pickle without creating them; for a file in torch's older, non-zip format,
    from the restricted unpickler's message."""
    if not isinstance(err, pickle.UnpicklingError):
        return []
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:
        return re.findall(r"GLOBAL (\S+)", str(err))[:1]


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def read_checkpoint(path: Path, command: str) -> tuple[RunConfig, dict, int]:
    """A training checkpoint -> (its RunConfig, the Decoder's state dict without the
    LightningModule's `model.` prefix, its global step). `command` names the caller in the
    one-line error a file that is not a gatelab checkpoint gives."""
    raw = load_checkpoint(path, command)
    try:
        config = from_dict(raw["hyper_parameters"]["config"])
        state = {name.removeprefix("model."): tensor
                 for name, tensor in raw["state_dict"].items() if name.startswith("model.")}
        step = int(raw.get("global_step", 0))
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise LabError(f"{command}: {path} is not a gatelab training checkpoint "
                       f"({type(err).__name__}: {_first_line(err)})") from None
    return config, state, step
