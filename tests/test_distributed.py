"""Stage A and the evaluation shared by the ranks of a torch.distributed group (torchrun, gloo on
the CPU): the same pack and the same report, to the bit, as one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import char_tokenizer, tiny_encoder, tiny_model

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="torchrun's CPU group (gloo) as CI runs it")

MEGEDIT = ["-m", "megedit.cli"]
# settings small enough for a tiny model (its own context prefixes are noise it cannot fit through in 30 steps);
# blocks of 4 x 2 = 8 edits, so two ranks share 16 edits
FIT = ["--layer", "1", "--fit-batch-size", "2", "--fit-max-steps", "30", "--fit-margin", "0", "--encoder-epochs", "1",
       "--encoder-batch-size", "8", "--generator-kind", "lookup", "--no-fit-chat-wording", "--fit-lone-prefixes", "0"]


def _folders(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A tiny LM and encoder saved as folders, and 16 edits with rephrases (their own pool follows them)."""
    model, encoder = tmp_path / "lm", tmp_path / "encoder"
    tiny_model("llama", init_range=0.2).save_pretrained(model)
    char_tokenizer().save_pretrained(model)
    tiny = tiny_encoder()
    tiny.model.save_pretrained(encoder)
    tiny.tokenizer.save_pretrained(encoder)
    data = tmp_path / "edits.jsonl"
    rows = [{"prompt": f"q{i}{i % 3}:", "target": "bdxa"[i % 4], "rephrases": [f"q{i}{i % 3} :"],
             "locality": [f"z{i}z"]} for i in range(52)]  # those after the edits are the pseudo-edit pool
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, encoder, data


def _run(ranks: int | None, *args, cwd: Path) -> subprocess.CompletedProcess:
    """megedit under torchrun with `ranks` processes (None: no launcher), one thread each as torchrun sets."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEGEDIT_CACHE": str(cwd / "cache")}
    launch = [] if ranks is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    done = subprocess.run([sys.executable, *launch, *MEGEDIT, *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env=env)
    assert done.returncode == 0, [line for line in done.stderr.splitlines() if "megedit" in line or "Error" in line][-12:]
    return done


def _pack_files(pack: Path) -> dict:
    """Every file of a pack, the tensors byte for byte, the records less what says how long things took (and the
    checksums of records that say it)."""
    def untimed(value):
        if isinstance(value, dict):
            return {k: untimed(v) for k, v in value.items()
                    if k not in ("timing", "seconds", "files", "manifest_sha256") and not k.endswith("_s")}
        return [untimed(v) for v in value] if isinstance(value, list) else value

    return {p.name: untimed(json.loads(p.read_text())) if p.suffix == ".json" else p.read_bytes()
            for p in sorted(pack.iterdir())}


def test_two_ranks_make_the_pack_and_report_of_one_to_the_bit(tmp_path):
    model, encoder, data = _folders(tmp_path)
    common = ["--model", model, "--encoder", encoder, "--data", f"jsonl:{data}", "--limit", "16", "--quiet"]
    packs = {}
    for ranks in (None, 1, 2):
        name = f"pack-{ranks}"
        _run(ranks, "fit", *common, *FIT, "--out", tmp_path / name, cwd=tmp_path)
        packs[ranks] = tmp_path / name
    shards = list((tmp_path / "pack-2.work" / "fit-shards").glob("fit-*/shard-*.safetensors"))
    assert len(shards) == 2  # each rank fitted its block into the shared work dir
    files = {ranks: _pack_files(pack) for ranks, pack in packs.items()}
    assert files[None]["edits.safetensors"] == files[1]["edits.safetensors"] == files[2]["edits.safetensors"]
    assert files[1] == files[2]

    reports = {}
    for ranks in (1, 2):
        out = tmp_path / f"eval-{ranks}.json"
        _run(ranks, "eval", packs[1], "--model", model, "--data", f"jsonl:{data}", "--limit", "16", "--quiet",
             "--max-new-tokens", "4", "--batch-size", "2", "--json", out, cwd=tmp_path)
        reports[ranks] = json.loads(out.read_text())
        assert not list(tmp_path.glob(f"eval-{ranks}.json.partial*"))  # the checkpoint and its parts are gone
    assert reports[1]["cases"] == reports[2]["cases"] and reports[1]["metrics"] == reports[2]["metrics"]


def test_fit_neurons_and_its_eval_shared_by_two_ranks_match_one_process(tmp_path):
    model, _, data = _folders(tmp_path)
    # 40 edits: more than one evaluation batch of 32, so the ranks share the decoding
    args = ["fit-neurons", "--model", model, "--data", f"jsonl:{data}", "--limit", "40", "--quiet", "--layer", "1",
            "--batch-size", "2", "--max-steps", "30", "--margin", "0", "--eval"]
    for ranks in (None, 2):
        _run(ranks, *args, "--work-dir", tmp_path / f"work-{ranks}", "--out", tmp_path / f"v-{ranks}.safetensors",
             cwd=tmp_path)
    read = {ranks: (tmp_path / f"v-{ranks}.safetensors").read_bytes() for ranks in (None, 2)}
    assert read[None] == read[2]
    reports = [json.loads((tmp_path / f"v-{ranks}.eval.json").read_text()) for ranks in (None, 2)]
    assert reports[0]["cases"] == reports[1]["cases"]


def test_a_verb_that_runs_in_one_process_refuses_a_launcher_in_one_line(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0"}
    done = subprocess.run([sys.executable, *MEGEDIT, "config"], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "megedit: error: megedit config runs in one process; start it without a launcher (WORLD_SIZE=2; fit, "
        "fit-neurons, eval share their work between ranks)"]


def test_the_two_node_script_runs_fit_and_eval_as_two_machines_would(tmp_path):
    import socket

    model, encoder, data = _folders(tmp_path)
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = " ".join(map(str, ["--encoder", encoder, "--limit", "16", *FIT]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "MASTER_PORT": str(port),
           "DATA": f"jsonl:{data}", "MODEL": str(model), "FIT_FLAGS": flags,
           "EVAL_FLAGS": "--limit 16 --max-new-tokens 4 --batch-size 2"}
    script = Path(__file__).resolve().parents[1] / "scripts" / "two_nodes.sh"
    done = subprocess.run(["bash", str(script), str(tmp_path / "run")], capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    _run(None, "fit", "--model", model, "--data", f"jsonl:{data}", "--quiet", *flags.split(), "--out", tmp_path / "one",
         cwd=tmp_path)
    assert (tmp_path / "run/pack/edits.safetensors").read_bytes() == (tmp_path / "one/edits.safetensors").read_bytes()
    assert json.loads((tmp_path / "run/eval.json").read_text())["n"] == 16
