"""bench/scale_curve.py's run loop: which points it runs, with which settings, and that a failed
point stops it (no model runs: each point's process is replaced by a recorder)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def scale_curve(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import scale_curve

    monkeypatch.setattr(scale_curve, "RESULTS", tmp_path)
    monkeypatch.setattr(scale_curve, "ran", [], raising=False)  # the recorder's state, removed afterwards
    monkeypatch.setattr(scale_curve, "exit_code", 0, raising=False)

    def fake_run(cmd, cwd=None):
        scale_curve.ran.append(cmd)
        return subprocess.CompletedProcess(cmd, scale_curve.exit_code)

    # scale_curve's own subprocess module only: the result writer still asks git for the revision
    monkeypatch.setattr(scale_curve, "subprocess", SimpleNamespace(run=fake_run, Popen=subprocess.Popen))
    return scale_curve


def _run(module, monkeypatch, *argv: str) -> int:
    monkeypatch.setattr(sys, "argv", ["scale_curve.py", *argv])
    return module.main()


def test_missing_points_run_with_the_chosen_baseline_settings(scale_curve, monkeypatch, tmp_path):
    assert _run(scale_curve, monkeypatch, "--sizes", "1024", "--methods", "memit,alphaedit") == 0
    assert [cmd[cmd.index("--methods") + 1] for cmd in scale_curve.ran] == ["memit:2000:1-5", "alphaedit:10:1-5"]
    assert all(cmd[cmd.index("--contexts") + 1] == "0" and cmd[cmd.index("--limit") + 1] == "1024"
               for cmd in scale_curve.ran)
    assert json.loads((tmp_path / "scale_curve.json").read_text())["result"]["points"] == []


def test_a_point_of_the_setup_of_before_runs_again_and_a_current_one_does_not(scale_curve, monkeypatch, tmp_path):
    old = {"method": "memit", "edit": {"layers": [4, 5, 6, 7, 8]}}  # no context_prefixes: setup of before
    new = {"method": "alphaedit", "edit": {"layers": [1, 2, 3, 4, 5], "context_prefixes": 0, "kl_factor": 0.0625,
                                           "l2": 10.0}}
    (tmp_path / "baseline-cf-1024-memit.json").write_text(json.dumps(old))
    (tmp_path / "baseline-cf-1024-alphaedit.json").write_text(json.dumps(new))
    monkeypatch.setattr(scale_curve, "collect", lambda sizes, methods: [])  # these stubs are not full results
    assert _run(scale_curve, monkeypatch, "--sizes", "1024", "--methods", "memit,alphaedit") == 0
    assert [cmd[cmd.index("--methods") + 1] for cmd in scale_curve.ran] == ["memit:2000:1-5"]


def test_a_failed_point_stops_the_curve_with_its_exit_code(scale_curve, monkeypatch, tmp_path):
    scale_curve.exit_code = 3
    assert _run(scale_curve, monkeypatch, "--sizes", "1024,2048", "--methods", "ft") == 3
    assert len(scale_curve.ran) == 1
    assert not (tmp_path / "scale_curve.json").exists()


def test_value_parts_search_in_one_thread_processes_side_by_side_before_the_point(scale_curve, monkeypatch):
    started = []

    class FakePopen:
        def __init__(self, cmd, cwd=None, env=None):
            started.append((cmd, env["OMP_NUM_THREADS"], len(scale_curve.ran)))

        def wait(self):
            return scale_curve.exit_code

    monkeypatch.setattr(scale_curve.subprocess, "Popen", FakePopen)
    assert _run(scale_curve, monkeypatch, "--sizes", "2048", "--methods", "ft,memit", "--value-parts", "2") == 0
    assert [(cmd[cmd.index("--values-part") + 1], threads, ran_before) for cmd, threads, ran_before in started] == [
        ("1/2", "1", 1), ("2/2", "1", 1)]  # after the ft point, before the memit point; none for ft
    assert all("--force" not in cmd and cmd[cmd.index("--methods") + 1] == "memit:2000:1-5" for cmd, _, _ in started)
    assert [cmd[cmd.index("--methods") + 1] for cmd in scale_curve.ran] == ["ft", "memit:2000:1-5"]

    started.clear()
    scale_curve.ran.clear()
    scale_curve.exit_code = -9  # a part killed by a signal: the point is not run, the curve stops
    assert _run(scale_curve, monkeypatch, "--sizes", "4096", "--methods", "alphaedit", "--value-parts", "2") == -9
    assert len(started) == 2 and scale_curve.ran == []


def test_processes_reach_every_point_and_the_threads_column_says_so(scale_curve, monkeypatch):
    assert _run(scale_curve, monkeypatch, "--sizes", "1024", "--methods", "meg,ft", "--processes", "2") == 0
    meg, ft = scale_curve.ran
    assert meg[meg.index("--processes") + 1] == "2" and ft[ft.index("--eval-processes") + 1] == "2"
    assert scale_curve.threads({"threads": 1, "processes": 2}) == "1; stage A and eval 2 x 1"
    assert scale_curve.threads({"machine": {"cpu_threads": 1, "eval_processes": 2}}) == "1; eval 2 x 1"
    assert scale_curve.threads({"machine": {"cpu_threads": 2}}) == "2" and scale_curve.threads({}) is None


def test_each_methods_label_comes_from_its_registry_entry(scale_curve):
    assert [m for m in scale_curve.METHODS if scale_curve.fitted(m)] == ["meg"] and not scale_curve.fitted("none")
    edit = {"layers": [1, 2, 3], "context_prefixes": 0, "kl_factor": 0.0625, "mom2_weight": 2000.0, "l2": 10.0}
    memit = scale_curve.method_label({"method": "memit", "edit": edit})
    assert memit == "memit (lambda 2000, layers 1-3, 0 prefixes, KL 0.0625)"
    assert scale_curve.method_label({"method": "alphaedit", "edit": edit}).startswith("alphaedit (a 10, layers 1-3")
    ft = {"layer": 24, "lr": 3.0, "epochs": 8}
    assert scale_curve.method_label({"method": "ft", "edit": ft}) == "ft (layer 24, SGD lr 3, 8 epochs)"
    assert scale_curve.method_label({"method": "none"}) == "none"
