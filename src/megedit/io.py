"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError, MeGError


def _umask() -> int:
    """The process's umask, read race-free from /proc where it is there (os.umask can only be
    read by setting it, which a thread creating a file at that moment would see)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _usual_mode(path: str | Path, folder: bool = False) -> Path:
    """Give `path` the mode a plain open() or mkdir() would have (0o666 / 0o777 less the umask):
    tempfile makes files 0o600 and folders 0o700, which would leave packs and caches written
    atomically unreadable to the group or to a server running as another user."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())
    return Path(path)


def temp_folder_beside(target: Path, prefix: str, suffix: str = "") -> Path:
    """A fresh folder in `target`'s parent (so it can be renamed onto `target`), with the mode
    mkdir() would give: a folder written whole, then moved into place."""
    return _usual_mode(tempfile.mkdtemp(dir=target.parent, prefix=prefix, suffix=suffix), folder=True)


def parse_text(text: str, parse: Callable[[str], Any] = json.loads) -> Any:
    """`parse(text)` (json.loads, yaml.safe_load); nesting too deep for Python's stack is a
    ValueError like any other malformed text, so callers' one-line errors cover it."""
    try:
        return parse(text)
    except RecursionError:
        raise ValueError("nested too deeply to read") from None


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """The file's sha256, read in chunks (a model's weights need not fit in memory twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _usual_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def atomic_save_tensors(path: str | Path, tensors: dict) -> Path:
    """A safetensors file, written atomically (tensors are made contiguous on the CPU)."""
    from safetensors.torch import save

    return atomic_write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


def save_keyed_state(path: str | Path, key: str, state: dict) -> Path:
    """`state` (tensors, numbers, lists) with the `key` of the run that wrote it, torch-saved
    atomically: a resumable run's checkpoint."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({"key": key} | state, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def load_keyed_state(path: str | Path, key: str, what: str) -> dict | None:
    """The state `save_keyed_state` left in `path` for `key`; None when there is no such file or
    another run (another key) wrote it; a one-line MeGError naming the file when it is unreadable."""
    import logging
    import pickle

    import torch

    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise MeGError(f"{path}: not a readable {what} ({error}); delete it to start afresh") from None
    if not isinstance(state, dict) or state.get("key") != key:
        logging.getLogger(__name__).warning("%s: a %s of another run (model, data or settings); starting afresh",
                                            path, what)
        return None
    return state


def load_tensors(path: str | Path, what: str) -> dict:
    """The tensors of a safetensors file; a one-line MeGError naming the file if it is unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise MeGError(f"{path}: not a readable {what} ({error})") from None


def read_record(path: str | Path, what: str, parse=lambda meta: meta):
    """`parse(meta)` of the JSON record beside a safetensors file (`x.safetensors` -> `x.json`);
    a one-line MeGError naming the record if it is unreadable or `parse` finds it malformed."""
    record = Path(path).with_suffix(".json")
    try:
        return parse(parse_text(record.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, KeyError, ConfigError) as error:
        raise MeGError(f"{record}: not a readable {what} record ({error})") from None
