"""MeGEditor, EditedModel and edit packs on a tiny random LM and encoder."""

import dataclasses
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import char_tokenizer, tiny_encoder, tiny_model

from megedit import EditedModel, MeGConfig, MeGEditor
from megedit.data import EditRequest, LocalityQuery
from megedit.errors import ConfigError, MeGError
from megedit.stages.fit_config import FitConfig

HERE = Path(__file__).resolve().parent


def _config(**generator) -> MeGConfig:
    config = MeGConfig(layer=1, fit=FitConfig(batch_size=4, max_steps=40, margin=0.0))
    config.routing.encoder.epochs, config.routing.encoder.batch_size = 1, 8
    config.generator.kind, config.generator.mlp = "mlp", {"hidden": 32, "depth": 1}  # a trained generator's mechanics
    # enough for the generated vectors to reproduce answers that end with EOS on this tiny model
    config.generator.train_steps, config.generator.validate_every, config.generator.batch_size = 200, 100, 8
    config.generator.passes, config.generator.lr = None, 1e-2
    for k, v in generator.items():
        setattr(config.generator, k, v)
    return config


# targets these tiny fits reach, each followed by EOS, within max_steps
EDITS = [EditRequest(f"e{i}", f"q{i}:", "bdxa"[i], rephrases=(f"q{i} :",), locality=(LocalityQuery("zzzz"),))
         for i in range(4)]
POOL = [EditRequest(f"p{i}", f"w{i}{i}=", "c", rephrases=(f"w{i}{i} =",), locality=(LocalityQuery(f"~{i}~{i}"),))
        for i in range(12)]


def _lm():
    return tiny_model("llama", init_range=0.2), char_tokenizer()


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    model, tok = _lm()
    work = tmp_path_factory.mktemp("work")
    edited = MeGEditor(model, tok, _config(), encoder=tiny_encoder(), progress=False).fit(EDITS, work, POOL)
    yield edited, work
    edited.close()


def test_fit_runs_the_four_stages_and_reports_them(fitted):
    edited, work = fitted
    r = edited.record
    assert r["n_edits"] == 4 and set(r["timing"]) == {"A", "BC", "D", "total_s"}
    assert r["fit"]["success_rate"] > 0
    assert [len(list((work / s).iterdir())) for s in ("fit-neurons", "routing", "generator")] == [1, 1, 1]
    assert edited.describe()["generator"] == "mlp" and edited.describe()["spec"]["layer"] == 1


def _own_copy(work: Path, tmp_path: Path) -> Path:
    """The fixture's work dir copied, for a test that adds to it: the others see it as the fixture left it, in any order."""
    return Path(shutil.copytree(work, tmp_path / "work"))


def test_a_rerun_reuses_every_stage_and_a_changed_setting_reruns_only_what_depends_on_it(fitted, caplog, tmp_path):
    edited, work = fitted[0], _own_copy(fitted[1], tmp_path)
    model, tok = _lm()
    with caplog.at_level(logging.INFO, logger="megedit"):
        again = MeGEditor(model, tok, _config(), encoder=tiny_encoder(), progress=False).fit(EDITS, work, POOL)
    assert sum("done before" in m for m in caplog.messages) == 4  # stages A, B, C and D
    texts = [r.prompt for r in EDITS] + ["zzzz"]
    assert torch.equal(again.vectors_for(texts), edited.vectors_for(texts))
    again.close()
    other = MeGEditor(model, tok, _config(train_steps=30), encoder=tiny_encoder(), progress=False).fit(EDITS, work, POOL)
    other.close()
    assert [len(list((work / s).iterdir())) for s in ("fit-neurons", "routing", "generator")] == [1, 1, 2]
    gated = _config()
    gated.routing.router.question_gate, gated.routing.router.question_gate_lone = 0.7, 0.5
    gated = MeGEditor(model, tok, gated, encoder=tiny_encoder(), progress=False).fit(EDITS, work, POOL)
    gated.close()  # the gate acts on queries after stage C: stage C is reused and takes the new thresholds
    assert (gated.router.config.question_gate, gated.router.config.question_gate_lone) == (0.7, 0.5)
    assert [len(list((work / s).iterdir())) for s in ("fit-neurons", "routing", "generator")] == [1, 1, 2]


def test_another_edit_set_in_the_same_work_dir_reuses_fitted_edits_and_the_encoder(fitted, caplog, tmp_path):
    edited, work = fitted[0], _own_copy(fitted[1], tmp_path)
    model, tok = _lm()
    with caplog.at_level(logging.INFO, logger="megedit"):
        more = MeGEditor(model, tok, _config(), encoder=tiny_encoder(), progress=False).fit(EDITS[:3], work, POOL)
    assert [m.split(":")[0] for m in caplog.messages if "done before" in m] == ["stage B (encoder)"]
    assert more.record["timing"]["A"]["reused_edits"] == 3  # its edits were fitted in the first run
    assert more.record["timing"]["BC"]["encoder"]["cached"] and len(list((work / "encoder").iterdir())) == 1
    texts = ["q0:", "w11 =", "zzzz"]
    assert torch.equal(more.encoder.encode(texts), edited.encoder.encode(texts))
    more.close()


def test_stage_a_in_two_processes_gives_the_fit_of_one(fitted, tmp_path):
    edited, _ = fitted
    model, tok = _lm()
    both = MeGEditor(model, tok, _config(), encoder=tiny_encoder(), progress=False, processes=2).fit(EDITS, tmp_path, POOL)
    assert both.record["fit"]["timing"]["forked_edits"] == len(EDITS)  # the forked parts fitted every edit
    assert both.record["fit"]["success_rate"] == edited.record["fit"]["success_rate"]
    torch.testing.assert_close(both.edits.vectors, edited.edits.vectors, atol=1e-5, rtol=1e-5)
    both.close()
    with pytest.raises(ConfigError, match="processes must be >= 1"):  # refused at once, before any stage runs
        MeGEditor(model, tok, _config(), encoder=tiny_encoder(), progress=False, processes=0)


def test_routing_names_each_query_s_nearest_edit_from_the_same_search(fitted):
    edited, _ = fitted
    texts = ["q0:", "q1:", "zzzz"]
    emb, distance, familiar, rows = edited.route_to_edits(texts)
    assert rows == edited.router.nearest_edit(emb) and rows[:2] == [0, 1]  # an edit prompt is nearest to itself
    assert torch.equal(distance, edited.route(texts)[1]) and torch.equal(familiar, edited.route(texts)[2])
    routing = edited.routing(texts)
    assert routing.edits == ["e0", "e1", None]


def test_unfamiliar_queries_get_the_zero_vector_and_disabling_gives_the_exact_base_model(fitted):
    edited, _ = fitted
    _, distance, familiar = edited.route(["q0:", "zzzz"])
    vectors = edited.vectors_for(["q0:", "zzzz"])
    assert familiar.tolist() == (distance < edited.router.epsilon).tolist()
    assert familiar[0] and vectors[0].abs().sum() > 0  # an edit prompt is at distance 0 from itself
    assert not familiar[1] and torch.equal(vectors[1], torch.zeros_like(vectors[1]))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        edited.neuron.set_weights(torch.ones(1, edited.spec.size))
        on = edited.model(ids).logits
        edited.enabled = False
        off = edited.model(ids).logits
        edited.enabled = True
        edited.neuron.set_weights(None)
        edited.neuron.detach()
        base = edited.model(ids).logits
        edited.neuron.attach()
    assert torch.equal(off, base) and not torch.equal(on, base)


def test_generate_agrees_with_the_harness_and_edits_take(fitted):
    from megedit.eval import evaluate

    edited, _ = fitted
    report = evaluate(edited, EDITS, progress=False)
    rows = [c for c in report.cases if c["kind"] == "reliability"]
    answers = edited.generate([r.prompt for r in EDITS], max_new_tokens=20)
    # the harness stops decoding a row once it cannot match, so compare the rows that matched
    assert [a for a, c in zip(answers, rows) if c["ag"]] == [c["got"] for c in rows if c["ag"]]
    fitted_ok = round(edited.record["fit"]["success_rate"] * len(EDITS) / 100)
    assert fitted_ok >= 1 and sum(a == r.target for a, r in zip(answers, EDITS)) >= fitted_ok
    assert report.metrics["locality"]["ag"] == 100.0  # "zzzz" is routed off: the base model's answer
    both = evaluate(edited, EDITS, progress=False, batch_size=2, processes=2)  # routing and generation in forked parts
    assert both.cases == report.cases


def test_pack_round_trip_gives_identical_answers_in_a_fresh_process(fitted, tmp_path):
    edited, _ = fitted
    pack = edited.save_pretrained(tmp_path / "pack")
    assert sorted(p.name for p in pack.iterdir()) == sorted(
        ["pack.json", "encoder.safetensors", "encoder.json", "router.safetensors", "router.json",
         "generator.safetensors", "generator.json", "edits.safetensors", "edits.json"])
    prompts = [r.prompt for r in EDITS] + [r.rephrases[0] for r in EDITS] + ["zzzz"]
    here = edited.generate(prompts, max_new_tokens=4)
    script = (f"import sys, json; sys.path.insert(0, {str(HERE)!r})\n"
              "from tiny import char_tokenizer, tiny_encoder, tiny_model\n"
              "from megedit import EditedModel\n"
              f"e = EditedModel.from_pretrained({str(pack)!r}, tiny_model('llama', init_range=0.2), char_tokenizer(),"
              " encoder=tiny_encoder())\n"
              f"print(json.dumps(e.generate({prompts!r}, max_new_tokens=4)))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here


def test_a_pack_refuses_another_base_model(fitted, tmp_path):
    edited, _ = fitted
    pack = edited.save_pretrained(tmp_path / "pack")
    other = tiny_model("llama", seed=1, init_range=0.2)
    with pytest.raises(MeGError, match="another base model"):
        EditedModel.from_pretrained(pack, other, char_tokenizer(), encoder=tiny_encoder())


@pytest.mark.parametrize("damage,message", [
    (lambda p: (p / "generator.safetensors").write_bytes((p / "generator.safetensors").read_bytes()[:100]),
     "checksum mismatch"),
    (lambda p: (p / "router.safetensors").unlink(), "missing from the edit pack"),
    (lambda p: (p / "pack.json").write_text("{not json"), "not a readable edit pack manifest"),
    (lambda p: (p / "pack.json").write_text('{"format": "other"}'), "not a megedit edit pack"),
    (lambda p: (p / "pack.json").unlink(), "not a readable edit pack manifest"),
])
def test_a_damaged_pack_gives_a_one_line_error(fitted, tmp_path, damage, message):
    edited, _ = fitted
    pack = edited.save_pretrained(tmp_path / "pack")
    damage(pack)
    model, tok = _lm()
    with pytest.raises(MeGError, match=message) as error:
        EditedModel.from_pretrained(pack, model, tok, encoder=tiny_encoder())
    assert "\n" not in str(error.value)


def test_saving_over_a_pack_is_atomic(fitted, tmp_path, monkeypatch):
    edited, _ = fitted
    pack = edited.save_pretrained(tmp_path / "pack")
    before = (pack / "pack.json").read_text()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(edited.generator, "save", fail)
    with pytest.raises(OSError):
        edited.save_pretrained(pack)
    assert (pack / "pack.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["pack"]  # no half-written folder left


def test_config_from_files_checks_names_and_spreads_the_seed(tmp_path):
    (tmp_path / "c.yaml").write_text("layer: 3\nseed: 7\ngenerator: {kind: dit, train_steps: 10}\n"
                                     "routing: {router: {kind: entropy}}\n")
    config = MeGConfig.from_file(tmp_path / "c.yaml").resolved()
    assert config.fit.layer == 3 and config.generator.kind == "dit" and config.generator.train_steps == 10
    assert config.generator.passes is None and MeGConfig().generator.passes == 500
    assert config.routing.router.kind == "entropy"
    assert {config.fit.init_seed, config.routing.seed, config.routing.encoder.seed, config.routing.router.seed,
            config.generator.seed} == {7}
    assert MeGConfig.from_dict(config.to_dict()) == config
    assert MeGConfig.from_dict({}).generator.kind == "lookup"
    with pytest.raises(ConfigError, match="unknown setting.*generater"):
        MeGConfig.from_dict({"generater": {}})
    with pytest.raises(ConfigError, match=r"config.generator: unknown setting.*steps"):
        MeGConfig.from_dict({"generator": {"steps": 3}})
    (tmp_path / "bad.yaml").write_text("layer: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml: not a readable config file"):
        MeGConfig.from_file(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="prompt_format must be one of raw, qa, chat, found 'fancy'"):
        MeGConfig(prompt_format="fancy").resolved()


def test_fit_needs_edits_and_falls_back_to_the_shipped_pool_without_one(tmp_path, caplog):
    from megedit.data.demo import fallback_pool
    from megedit.editor import usable_pool

    model, tok = _lm()
    editor = MeGEditor(model, tok, _config(), encoder=tiny_encoder(), progress=False)
    with pytest.raises(ConfigError, match="no edit requests"):
        editor.fit([], tmp_path, POOL)
    assert usable_pool(EDITS, POOL, "mine") == (POOL, "mine")
    no_rephrases = [dataclasses.replace(r, rephrases=()) for r in POOL]
    with caplog.at_level("INFO", logger="megedit.editor"):
        pool, name = usable_pool(EDITS, no_rephrases, "mine")
    assert name == "megedit fallback pool" and pool == fallback_pool() and len(pool) == 240
    assert "mine has 0 records with a rephrase" in caplog.text
    assert all(r.subject and len(r.rephrases) == 2 and r.locality for r in pool)


def test_fit_routing_alone_gives_the_editors_encoder_and_router(fitted):
    from megedit.stages.routing import fit_routing

    edited, _ = fitted
    routing = fit_routing(EDITS, POOL, tiny_encoder(), _config().routing, progress=False)
    texts = ["q0:", "w11 =", "zzzz"]
    assert torch.equal(routing.encoder.encode(texts), edited.encoder.encode(texts))
    assert routing.router.epsilon == edited.router.epsilon
    assert set(routing.record["timing"]) == {"encoder_s", "router_s", "total_s"}
