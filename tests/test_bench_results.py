"""bench/results' one schema (bench/result_schema.py): every stored result follows it, the shared
writer fills the provenance and refuses a record that breaks it, and bench/migrate_results.py wraps
a result of before the schema without changing its payload, once."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from megedit.io import file_sha256

BENCH = Path(__file__).resolve().parents[1] / "bench"
RESULT_FILES = sorted((BENCH / "results").glob("*.json"))


@pytest.fixture
def schema(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import result_schema

    return result_schema


@pytest.fixture
def migrate(schema):
    import migrate_results

    return migrate_results


def _write(schema, path: Path, **changes):
    provenance = {"model": "tiny", "n": 2, "seed": 0, "method": "meg", "config": {"lr": 0.1}} | changes
    return schema.write_result(path, {"metrics": {"reliability": {"ag": 100.0}}}, **provenance)


@pytest.mark.parametrize("path", RESULT_FILES, ids=[p.name for p in RESULT_FILES])
def test_every_stored_result_follows_the_schema(schema, path):
    assert schema.problems(json.loads(path.read_text())) == []


def test_the_writer_fills_the_provenance(schema, tmp_path, monkeypatch):
    data = tmp_path / "edits.json"
    data.write_text("[]")
    monkeypatch.setattr(sys, "argv", ["bench/meg.py", "counterfact"])
    record = json.loads(_write(schema, tmp_path / "r.json", data={"edits": data}).read_text())
    assert record["result"] == {"metrics": {"reliability": {"ag": 100.0}}}
    assert record["protocol"]["argv"] == ["counterfact"] and record["n"] == 2
    assert record["data"]["edits"]["sha256"] == file_sha256(data)
    assert record["versions"]["python"] and len(record["load"]["end"]) == 3 and record["timings"]["wall_s"] >= 0
    assert len(record["git"]["revision"] or "x" * 40) == 40
    assert record["unknown"]["model.fingerprint"]  # none given: said so, not left blank


@pytest.mark.parametrize("missing", ["n", "seed", "method", "config", "model"])
def test_the_writer_refuses_a_null_field_without_its_reason(schema, tmp_path, missing):
    with pytest.raises(schema.ResultError, match="null without a reason"):
        _write(schema, tmp_path / "r.json", **{missing: None})
    assert not (tmp_path / "r.json").exists()
    _write(schema, tmp_path / "r.json", **{missing: None},
           unknown={{"method": "method.name", "config": "method.config", "model": "model.name"}.get(missing, missing):
                    "not measured here"})
    assert schema.read(tmp_path / "r.json")["result"]


@pytest.mark.parametrize("field", ["seed", "versions", "result", "unknown"])
def test_a_record_missing_a_field_breaks_the_schema(schema, tmp_path, field):
    record = json.loads(_write(schema, tmp_path / "r.json").read_text())
    del record[field]
    with pytest.raises(schema.ResultError, match=field):
        schema.check(record)


def test_a_mistyped_field_breaks_the_schema(schema, tmp_path):
    record = json.loads(_write(schema, tmp_path / "r.json").read_text())
    assert schema.problems({**record, "n": True}) == ["n: bool, expected int"]
    assert schema.problems({**record, "extra": 1}) == ["extra: not part of the schema"]


def test_migration_wraps_an_old_result_once_and_keeps_its_payload(migrate, schema, tmp_path):
    old = {"method": "ft", "model": "smollm2", "data": "counterfact:counterfact-edit.json", "n": 8, "seed": 0,
           "machine": {"cpu_threads": 2, "torch": "2.13.0+cpu", "python": "3.11.7"}, "metrics": {}, "score": 1.5}
    path = tmp_path / "baseline-cf-8-ft.json"
    path.write_text(json.dumps(old))
    assert migrate.migrate(path) == "wrapped"
    record = schema.read(path)
    assert record["result"] == old | {"score_all": None}  # the one key bench/baselines.py writes today
    assert "no specificity" in record["unknown"]["result.score_all"]
    assert record["protocol"]["script"] == "bench/baselines.py"
    assert (record["n"], record["threads"], record["versions"]["torch"]) == (8, 2, "2.13.0+cpu")
    assert record["data"]["edits"] == {"path": "counterfact:counterfact-edit.json", "sha256": None}
    assert record["git"]["revision"] is None and "git.revision" in record["unknown"]  # never guessed
    text = path.read_text()
    assert migrate.migrate(path) == "kept" and path.read_text() == text


def test_migration_fills_the_keys_a_bench_script_writes_today_once(migrate, schema, tmp_path):
    path = tmp_path / "baseline_sweep-4.json"
    rows = [{"method": "memit", "settings": {"v_steps": 20, "values_reused_batches": 0}},
            {"method": "ft", "settings": {}}]
    _write(schema, path)
    record = json.loads(path.read_text())
    record["result"] = {"cov_source": "pool", "rows": rows}
    path.write_text(json.dumps(record))
    assert migrate.migrate(path) == "filled"
    record = schema.read(path)
    assert record["result"]["threads"] == 1 and record["result"]["rows"][1] == {"method": "ft", "settings": {}}
    assert record["result"]["rows"][0]["settings"] == {"v_steps": 20, "values_reused_batches": 0, "cov_source": "pool",
                                                       "context_prefixes": 0, "kl_factor": 0,
                                                       "values_reused_edits": 0}  # no batch reused: no edit
    assert record["unknown"]["result.rows.0.settings.kl_factor"].endswith("filled with 0: MEMIT had no KL term then")
    text = path.read_text()
    assert migrate.migrate(path) == "kept" and path.read_text() == text


def test_migration_wraps_a_shape_it_does_not_know(migrate, schema, tmp_path):
    path = tmp_path / "something-new.json"
    path.write_text(json.dumps({"rows": [1, 2], "n": "many", "threads": True}))
    migrate.migrate(path)
    record = schema.read(path)
    assert record["protocol"]["script"] is None and record["n"] is None and record["threads"] is None


def test_a_bench_script_reads_a_payload_of_either_shape(schema, tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"rows": [1]}))
    assert schema.payload(old) == {"rows": [1]}
    assert schema.payload(_write(schema, tmp_path / "new.json")) == {"metrics": {"reliability": {"ag": 100.0}}}
