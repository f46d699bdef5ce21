"""Edit packs never overwrite what is not a pack: user files at --out survive, and concurrent
writers to one folder end with one whole pack."""

import json
import subprocess
import sys
import threading

import pytest
from test_editor import fitted  # noqa: F401  (the module-scoped fitted pack)

from megedit.io import file_sha256
from megedit.pack import check_pack_target, read_manifest
from megedit.errors import MeGError

MEGEDIT = [sys.executable, "-m", "megedit.cli"]


def test_a_folder_with_user_files_is_refused_and_kept(fitted, tmp_path):  # noqa: F811
    edited, _ = fitted
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(MeGError, match="holds no megedit edit pack"):
        edited.save_pretrained(user)
    assert (user / "thesis.tex").read_text() == "years of work" and sorted(p.name for p in user.iterdir()) == ["thesis.tex"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_a_file_is_refused_and_kept(fitted, tmp_path):  # noqa: F811
    edited, _ = fitted
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    with pytest.raises(MeGError, match="not an edit pack folder"):
        edited.save_pretrained(target)
    assert target.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_an_empty_folder_and_an_earlier_pack_are_replaced(fitted, tmp_path):  # noqa: F811
    edited, _ = fitted
    (tmp_path / "pack").mkdir()
    edited.save_pretrained(tmp_path / "pack")
    edited.save_pretrained(tmp_path / "pack")
    assert json.loads((tmp_path / "pack" / "pack.json").read_text())["format"] == "megedit-pack"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pack"]


def test_concurrent_writers_end_with_one_intact_pack(fitted, tmp_path):  # noqa: F811
    edited, _ = fitted
    errors = []

    def save():
        try:
            edited.save_pretrained(tmp_path / "pack")
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(repr(error))

    threads = [threading.Thread(target=save) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pack"]
    manifest = read_manifest(tmp_path / "pack")  # whole: every file there with its recorded checksum
    assert all(file_sha256(tmp_path / "pack" / name) == digest for name, digest in manifest["files"].items())


@pytest.mark.parametrize("make", ["folder", "file"])
def test_cli_fit_refuses_a_non_pack_out_before_fitting(tmp_path, make):
    out = tmp_path / "out"
    if make == "folder":
        out.mkdir()
        (out / "data.csv").write_text("a,b\n")
    else:
        out.write_text("x")
    data = tmp_path / "edits.jsonl"
    data.write_text(json.dumps({"case_id": "1", "prompt": "p", "target": "t"}) + "\n")
    run = subprocess.run([*MEGEDIT, "fit", "--data", f"jsonl:{data}", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0] and "refusing to replace it" in lines[0]
    assert (out / "data.csv").read_text() == "a,b\n" if make == "folder" else out.read_text() == "x"


def test_check_pack_target_accepts_what_may_be_replaced(tmp_path):
    check_pack_target(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    check_pack_target(tmp_path / "empty")
    (tmp_path / "pack").mkdir()
    (tmp_path / "pack" / "pack.json").write_text(json.dumps({"format": "megedit-pack"}))
    check_pack_target(tmp_path / "pack")


def test_a_pack_gets_the_modes_the_umask_gives(fitted, tmp_path):  # noqa: F811
    """Atomic writes go through temporary files (0o600) and folders (0o700): the pack must still
    be readable as the user's umask allows, e.g. by a server running as another user."""
    import os
    import stat

    edited, _ = fitted
    before = os.umask(0o027)
    try:
        edited.save_pretrained(tmp_path / "pack")
    finally:
        os.umask(before)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "pack").iterdir()}
    assert stat.S_IMODE((tmp_path / "pack").stat().st_mode) == 0o750
    assert "pack.json" in modes and set(modes.values()) == {0o640}, modes
