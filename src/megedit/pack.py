"""The edit pack as a folder: its manifest (pack.json, with its own checksum and every file's),
which folders may be replaced by a pack, and the atomic swap that puts a finished pack in place.

Version 3 packs may hold the edit table (edit_table.py: the edits' ids, prompts, wordings and
fitted vectors, which adding and removing edits need); version 2 packs, from before, have none
and still load.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

from .edit_table import EDIT_FILES
from .errors import MeGError
from .io import atomic_write_json, file_sha256, parse_text, temp_folder_beside

PACK_FORMAT, PACK_VERSION = "megedit-pack", 3  # 2: pack.json holds its own checksum; 3: the edit table, history
READ_VERSIONS = (2, 3)
PACK_FILES = ("encoder.safetensors", "encoder.json", "router.safetensors", "router.json",
              "generator.safetensors", "generator.json")


def read_manifest(directory: Path) -> dict:
    """pack.json of an edit pack, checked for the fields a pack must have."""
    path = directory / "pack.json"
    if not directory.is_dir():
        raise MeGError(f"{directory}: no such edit pack folder")
    try:
        manifest = parse_text(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise MeGError(f"{path}: not a readable edit pack manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != PACK_FORMAT:
        raise MeGError(f"{path}: not a megedit edit pack (format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if manifest.get("version") not in READ_VERSIONS:
        raise MeGError(f"{path}: pack version {manifest.get('version')!r}; this megedit reads versions "
                       f"{', '.join(map(str, READ_VERSIONS))}")
    if manifest.get("manifest_sha256") != manifest_sha256(manifest):  # a hand edit would load and answer wrongly
        raise MeGError(f"{path}: changed since the pack was written (its checksum does not match its content)")
    missing = [k for k in ("base_model", "spec", "prompt_format", "files") if k not in manifest]
    files = set(manifest.get("files", {}))
    if missing or not (files == set(PACK_FILES) or manifest["version"] >= 3 and files == {*PACK_FILES, *EDIT_FILES}):
        raise MeGError(f"{path}: incomplete manifest (missing {missing or 'file checksums'})")
    if type(manifest.get("sample_seed", 0)) is not int:  # not a bool, a float or a string either
        raise MeGError(f"{path}: sample_seed must be an integer, found {manifest['sample_seed']!r}")
    return manifest


def manifest_sha256(manifest: dict) -> str:
    """Checksum of pack.json's content (all but this checksum), as JSON reads it back, keys sorted."""
    content = json.loads(json.dumps({k: v for k, v in manifest.items() if k != "manifest_sha256"}))
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def pack_file_sha256(path: Path) -> str:
    """A pack file's sha256; a missing or unreadable file is a damaged pack."""
    try:
        return file_sha256(path)
    except OSError as error:
        raise MeGError(f"{path}: missing from the edit pack ({error.strerror})") from None


def check_pack_target(directory: str | Path) -> None:
    """Refuse a destination that holds anything but a megedit pack: only an absent path, an empty
    folder or an earlier pack (recognised by its pack.json) may be replaced. A folder that another
    writer swaps while it is looked at is looked at again."""
    directory = Path(directory)
    for _ in range(20):
        try:
            before = directory.lstat().st_ino
        except FileNotFoundError:
            return
        verdict = _pack_target_problem(directory)
        try:
            swapped = directory.lstat().st_ino != before
        except FileNotFoundError:
            swapped = True
        if verdict is None or not swapped:
            break
    if verdict is not None:
        raise MeGError(f"{directory}: {verdict}; refusing to replace it")


def _pack_target_problem(directory: Path) -> str | None:
    if directory.is_symlink() or not directory.is_dir():
        return "exists and is not an edit pack folder"
    try:
        if not any(directory.iterdir()):
            return None
        manifest = parse_text((directory / "pack.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != PACK_FORMAT:
        return "folder is not empty and holds no megedit edit pack"
    return None


def write_pack(directory: Path, manifest: dict, write: Callable[[Path], Sequence[str]]) -> Path:
    """Write a pack atomically: `write(folder)` puts the pack's files in a fresh folder beside
    `directory` and names them; pack.json (`manifest`, their checksums and its own) is written last;
    the folder then replaces `directory` whole (only an earlier pack may be there)."""
    check_pack_target(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_folder_beside(directory, prefix=f".{directory.name}.", suffix=".tmp")
    try:
        manifest = {**manifest, "files": {name: pack_file_sha256(tmp / name) for name in write(tmp)}}
        atomic_write_json(tmp / "pack.json", {**manifest, "manifest_sha256": manifest_sha256(manifest)})
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _replace_dir(tmp: Path, directory: Path, tries: int = 50) -> None:
    """Move the finished `tmp` folder to `directory`; an old pack there is removed only after.
    Concurrent writers race on the renames: each retries until its folder is in place, so the
    last one wins and every reader sees one whole pack."""
    for _ in range(tries):
        old = None
        if directory.exists():
            check_pack_target(directory)
            old = directory.with_name(f".{directory.name}.old-{time.time_ns()}")
            try:
                directory.rename(old)
            except FileNotFoundError:  # another writer moved it first
                continue
        try:
            tmp.rename(directory)
            return
        except OSError:  # another writer's folder arrived in between: try again
            continue
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    raise MeGError(f"{directory}: could not put the pack in place ({tries} concurrent writers in the way)")
