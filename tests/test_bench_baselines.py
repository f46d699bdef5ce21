"""bench/baselines.py --values-part: which slice of the edits each part searches (no model runs:
the search is replaced by a recorder), and the I/K argument's checks."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def baselines(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import baselines

    return baselines


def test_parts_cover_every_edit_once_with_the_runs_settings(baselines, monkeypatch):
    import megedit.baselines.memit as memit

    seen = []

    def recorder(model, tokenizer, requests, fmt, config, progress=True):
        seen.append((list(requests), config))
        return config, [], None, {"values_reused_edits": 0, "v_converged": 1.0}

    monkeypatch.setattr(memit, "search_values", recorder)
    edits = list(range(10))
    searches = baselines.value_search_configs("memit:2000:1-5", contexts=0, kl=0.0625, seed=0)
    for i in (1, 2, 3):
        assert baselines.search_values_part((i, 3), searches, None, None, edits, None) == 0
    assert [r for r, _ in seen] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    config = seen[0][1]
    assert (config.layers, config.mom2_weight, config.context_prefixes) == ((1, 2, 3, 4, 5), 2000.0, 0)


def test_only_memit_and_alphaedit_have_a_value_search(baselines):
    with pytest.raises(SystemExit, match="not 'ft:5e-4:24'"):
        baselines.value_search_configs("memit:2000:1-5,ft:5e-4:24", contexts=0, kl=0.0625, seed=0)


def test_a_run_spec_takes_the_settings_of_its_methods_class(baselines):
    from baseline_sweep import RUN_CONFIGS
    from megedit.baselines.config import FTConfig
    from megedit.methods import get_method

    paper = RUN_CONFIGS[get_method("ft").config]("ft", 0, 0.0, 3, 7)  # a bare ft: FTConfig's defaults at the layer
    assert paper == (None, FTConfig(layer=7, seed=3))
    lr, ft = RUN_CONFIGS[get_method("ft").config]("ft:5e-4:12:0.1", 0, 0.0, 3, 7)
    assert (lr, ft.layer, ft.optimizer, ft.norm_constraint) == (5e-4, 12, "adam", 0.1)
    weight, alpha = RUN_CONFIGS[get_method("alphaedit").config]("alphaedit:5:1-3", 0, 0.0, 3)
    assert (weight, alpha.method, alpha.l2, alpha.layers) == (5.0, "alphaedit", 5.0, (1, 2, 3))


@pytest.mark.parametrize("text", ["0/2", "3/2", "1", "a/b"])
def test_a_bad_part_is_refused(baselines, text):
    with pytest.raises(argparse.ArgumentTypeError, match="expected"):
        baselines.part(text)
    assert baselines.part("2/4") == (2, 4)


def test_a_killed_ft_run_resumes_from_its_last_epoch_and_counts_the_killed_epochs(baselines, monkeypatch, tmp_path,
                                                                                 shared_data):
    import json
    import sys

    import megedit
    from test_ft import _Killed, _killed_after
    from tiny import char_tokenizer, tiny_model

    monkeypatch.setenv("MEGEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(megedit, "load_model", lambda *a, **k: (tiny_model("llama", init_range=0.2), char_tokenizer()))
    monkeypatch.setattr(sys, "argv", ["baselines.py", "--limit", "2", "--methods", "ft", "--out", str(tmp_path)])
    training = tmp_path / "cases" / "baseline-cf-2-ft.ft-training.pt"
    _killed_after(monkeypatch, 3)
    with pytest.raises(_Killed):
        baselines.main()
    assert training.exists()
    calls = _killed_after(monkeypatch, 99)
    assert baselines.main() == 0
    record = json.loads((tmp_path / "baseline-cf-2-ft.json").read_text())
    summary = record["result"]  # the script's payload in the schema's envelope (bench/result_schema.py)
    assert record["method"]["name"] == "ft" and record["n"] == 2 and record["model"]["fingerprint"]
    assert len(calls) == 5 and len(summary["edit"]["epoch_losses"]) == 8  # FTConfig's 8, 3 of them before the kill
    assert summary["edit_time_s"] == summary["edit"]["edit_time_s"] and not training.exists()
