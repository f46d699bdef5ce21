"""Living edits: adding edits to a pack and removing some without a refit (megedit.add_edits,
remove_edits, `megedit add` / `megedit remove`), on a tiny LM and encoder saved as folders so that
fresh CLI processes load the very same ones."""

import dataclasses
import json
import logging
import shutil
from datetime import datetime

import pytest
import torch
from test_cli_interface import _error_line, _run
from test_editor import POOL
from tiny import char_tokenizer, tiny_encoder, tiny_model

from megedit import EditedModel, MeGConfig, MeGEditor, load_encoder, load_model
from megedit.data import EditRequest, LocalityQuery
from megedit.errors import ConfigError, MeGError
from megedit.living import AddConfig, add_edits, remove_edits
from megedit.io import file_sha256
from megedit.pack import PACK_FILES, manifest_sha256, read_manifest
from megedit.stages.fit_config import FitConfig
from megedit.stages.router import Router, RouterConfig



def _edit(case_id: str, prompt: str, target: str) -> EditRequest:
    return EditRequest(case_id, prompt, target, rephrases=(prompt + "!",), locality=(LocalityQuery("zzzz"),))


# prompts far apart for the tiny encoder, targets these fits reach with a margin (so that a generated
# vector a little off the fitted one still answers)
EDITS = [_edit("e0", "Kp7:", "x"), _edit("e1", "%m!:", "d"), _edit("e2", "Zed?", "a"), _edit("e3", "yyv:", "x")]
NEW = [_edit("n0", "Rome lies in", "a"), _edit("n1", "Lo&o", "x")]
AGAIN = _edit("e2", "Zed?", "d")  # a new fact for an edit the pack holds
UNRELATED = "zzzz"


def _config(encoder: str) -> MeGConfig:
    # no context prefixes: the ones a tiny random model writes are noise its edits cannot fit through
    # the tiny edits name no subject: their capitalised character strings ("Kp7:") are no names to take one from
    config = MeGConfig(layer=0, encoder=encoder, fit=FitConfig(batch_size=4, max_steps=200, lr=0.05, margin=0.5,
                                                               lone_prefixes=0), infer_subjects=False)
    config.routing.encoder.epochs, config.routing.encoder.batch_size = 1, 8
    config.generator.kind, config.generator.mlp = "mlp", {"hidden": 64, "depth": 2}  # a network: the fine-tune's budget
    config.generator.train_steps, config.generator.validate_every, config.generator.batch_size = 200, 100, 8
    config.generator.passes, config.generator.lr = None, 3e-3
    return config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(root, the LM folder, the encoder folder, the fitted pack's folder)."""
    root = tmp_path_factory.mktemp("living")
    tiny_model("llama", init_range=0.2).save_pretrained(root / "lm")
    char_tokenizer().save_pretrained(root / "lm")
    encoder = tiny_encoder()
    encoder.model.save_pretrained(root / "encoder")
    encoder.tokenizer.save_pretrained(root / "encoder")
    model, tok = load_model(str(root / "lm"), device="cpu")
    edited = MeGEditor(model, tok, _config(str(root / "encoder")), encoder=load_encoder(root / "encoder", device="cpu"),
                       progress=False).fit(EDITS, root / "work", POOL)
    assert edited.edits.fitted.all(), "the tiny edits should all fit"
    edited.save_pretrained(root / "pack")
    edited.close()
    return root, root / "lm", root / "encoder", root / "pack"


@pytest.fixture(scope="module")
def encoder(setup):
    return load_encoder(setup[2], device="cpu")


@pytest.fixture
def load(setup, encoder):
    """Load a pack onto a base model of its own (each EditedModel takes over its model's layer)."""
    loaded = []

    def load_pack(folder):
        model, tok = load_model(str(setup[1]), device="cpu")
        loaded.append(EditedModel.from_pretrained(folder, model, tok, encoder=encoder))
        return loaded[-1]

    yield load_pack
    for edited in loaded:
        edited.close()


@pytest.fixture(scope="module")
def grown(setup, encoder):
    """The pack with NEW added and e2 replaced by AGAIN (saved as root/grown); the pack it came from."""
    root, lm_dir, _, pack = setup
    model, tok = load_model(str(lm_dir), device="cpu")
    before = EditedModel.from_pretrained(pack, model, tok, encoder=encoder)
    after = add_edits(before, [*NEW, AGAIN], root / "add-work", pool=POOL, progress=False)
    after.save_pretrained(root / "grown")
    yield before, after
    after.close()


def _answers(edited, prompts):
    return edited.generate(prompts, max_new_tokens=4)


def test_added_edits_answer_their_targets_and_the_old_ones_keep_theirs(grown):
    before, after = grown
    assert not before.neuron.attached  # handed over: the model returned owns the base model now
    prompts = [r.prompt for r in EDITS + NEW]
    with after.unedited():
        base = _answers(after, prompts)
    assert _answers(after, prompts) == ["x", "d", "d", "x", "a", "x"]  # e2 answers its new fact
    assert all(b != t for b, t in zip(base, ["x", "d", "d", "x", "a", "x"]))  # every answer is the edit's doing
    routing = after.routing([*prompts, UNRELATED])
    assert routing.edits == ["e0", "e1", "e2", "e3", "n0", "n1", None]  # case ids, not indices
    assert after.router.epsilon == before.router.epsilon  # kept: no recalibration asked
    assert after.edits.case_ids == ["e0", "e1", "e3", "n0", "n1", "e2"] and len(after.router.bank) == 6
    assert torch.equal(after.vectors_for([UNRELATED]), torch.zeros(1, after.spec.size))


def test_the_generator_budget_follows_the_added_edits(grown):
    _, after = grown
    g = after.history[-1]["generator"]
    # the fit's 200 steps x batch 8 over 4 edits = 400 passes; 3 new edits, replayed 1:1 -> 400 * 3 * 2 / 8
    assert (g["passes"], g["replay"], g["steps"], g["new_pairs"]) == (400.0, 1.0, 300, 3)
    assert after.generator.record["steps"] == 300


def test_a_fine_tune_starts_from_the_generators_weights_and_keeps_its_normalisation(grown):
    from megedit.stages.generator import FineTune, train_generator

    before, _ = grown
    pack = before.generator
    cond = before.encoder.encode([r.prompt for r in EDITS])
    shifted = before.edits.vectors[:4] + 1.0  # vectors whose own statistics differ from the pack's
    one = train_generator(cond, shifted, fine_tune=FineTune(pack, 1, torch.ones(4)), progress=False)
    assert torch.equal(one.mean, pack.mean) and torch.equal(one.std, pack.std) and one.record["steps"] == 1
    fresh = train_generator(cond, shifted, dataclasses.replace(pack.config, train_steps=1, passes=None), progress=False)
    start = pack.generate(cond)
    moved = [float((g.generate(cond) - start).norm() / start.norm()) for g in (one, fresh)]
    assert moved[0] < 0.25 < 1 < moved[1], moved  # one step from the pack's generator, far from a fresh one's
    assert all(p.requires_grad is False for p in pack.net.parameters())  # the pack's own generator untouched


def test_a_lookup_pack_grows_and_shrinks_its_table_without_training(setup, encoder, tmp_path):
    config = _config(str(setup[2]))
    config.generator.kind = "lookup"  # the default generator
    model, tok = load_model(str(setup[1]), device="cpu")
    edited = MeGEditor(model, tok, config, encoder=encoder, progress=False).fit(EDITS, tmp_path / "work", POOL)
    keys = len(edited.generator.net.keys)
    # stage A of the new edits in two forked processes (megedit.parallel): the same answers as in one
    grown = add_edits(edited, [*NEW, AGAIN], tmp_path / "add", pool=POOL, progress=False, processes=2)
    smaller = None
    try:
        prompts = [r.prompt for r in EDITS + NEW]
        assert _answers(grown, prompts) == ["x", "d", "d", "x", "a", "x"]  # the new table holds every edit's vectors
        assert grown.history[-1]["generator"]["steps"] == 0 and len(grown.generator.net.keys) > keys
        smaller = remove_edits(grown, ["n0"], tmp_path / "remove", progress=False)
        with smaller.unedited():
            base = _answers(smaller, ["Rome lies in"])
        assert _answers(smaller, prompts) == ["x", "d", "d", "x", base[0], "x"]
        assert len(smaller.generator.net.keys) < len(grown.generator.net.keys)
    finally:
        for e in (smaller, grown):
            if e is not None:
                e.close()


def test_an_edit_the_pack_holds_is_replaced_and_logged(setup, load, tmp_path, caplog):
    edited = load(setup[3])
    with pytest.raises(ConfigError, match=r"already holds 'e2' \(same case id or prompt\)"):
        add_edits(edited, [AGAIN], tmp_path, replace=False, progress=False)
    assert edited.neuron.attached  # a refused add leaves the pack as it was
    with caplog.at_level(logging.INFO, logger="megedit"):
        after = add_edits(edited, [_edit("e9", "Zed?", "d")], tmp_path, progress=False)  # same prompt, new id
    try:
        assert any("replacing 1 edits" in m and "later fact wins" in m and "e2" in m for m in caplog.messages)
        assert after.edits.case_ids == ["e0", "e1", "e3", "e9"] and after.history[-1]["replaced"] == ["e2"]
        assert after.routing(["Zed?"]).edits == ["e9"] and _answers(after, ["Zed?"]) == ["d"]
    finally:
        after.close()


def test_remove_stops_an_edit_firing_and_keeps_the_others(setup, grown, load, tmp_path):
    prompts = [r.prompt for r in EDITS + NEW]
    smaller = remove_edits(load(setup[0] / "grown"), ["e0", "n1"], tmp_path, progress=False)
    try:
        routing = smaller.routing(prompts)
        assert routing.edits == [None, "e1", "e2", "e3", "n0", None]  # their bank rows are gone: they never fire
        assert not routing.fired[0] and not routing.fired[5]  # nor does another edit in their place
        with smaller.unedited():
            base = _answers(smaller, ["Kp7:", "Lo&o"])
        assert _answers(smaller, prompts) == [base[0], "d", "d", "x", "a", base[1]]
        assert smaller.edits.case_ids == ["e1", "e3", "n0", "e2"] and len(smaller.router.bank) == 4
        g = smaller.history[-1]["generator"]
        assert (g["steps"], g["replay"], g["new_pairs"]) == (100, 0.0, 0)  # 400 passes x 2 removed / batch 8
    finally:
        smaller.close()


def test_remove_refuses_unknown_ids_and_emptying_the_pack(grown, tmp_path):
    _, after = grown
    with pytest.raises(ConfigError, match=r"^remove: no edit with id 'zz' in the pack \(its 6 ids: e0, e1, e3, n0"):
        remove_edits(after, ["e1", "zz"], tmp_path)
    with pytest.raises(ConfigError, match="that is all 6 edits"):
        remove_edits(after, after.edits.case_ids, tmp_path)
    with pytest.raises(ConfigError, match="given twice"):
        add_edits(after, [NEW[0], NEW[0]], tmp_path)
    with pytest.raises(ConfigError, match="add config: passes must be > 0"):
        add_edits(after, NEW, tmp_path, config=AddConfig(passes=0.0))
    assert after.neuron.attached


def test_pack_json_records_the_changes_and_the_pack_loads_whole(setup, grown, load):
    _, after = grown
    folder = setup[0] / "grown"
    manifest = read_manifest(folder)
    assert manifest["version"] == 3 and {"edits.safetensors", "edits.json"} <= set(manifest["files"])
    (entry,) = manifest["history"]
    assert (entry["op"], entry["ids"], entry["replaced"], entry["n_before"], entry["n_after"]) == (
        "add", ["n0", "n1", "e2"], ["e2"], 4, 6)
    assert entry["fit"]["success_rate"] == 100.0 and datetime.fromisoformat(entry["time"]).tzinfo is not None
    assert manifest["record"]["n_edits"] == 6
    prompts = [r.prompt for r in EDITS + NEW]
    loaded = load(folder)
    assert _answers(loaded, prompts) == _answers(after, prompts) and loaded.history == after.history
    assert loaded.routing(prompts).edits == ["e0", "e1", "e2", "e3", "n0", "n1"]


def test_a_rerun_in_the_same_work_dir_reuses_stage_a_and_the_fine_tune(setup, grown, load, caplog):
    with caplog.at_level(logging.INFO, logger="megedit"):
        again = add_edits(load(setup[3]), [*NEW, AGAIN], setup[0] / "add-work", pool=POOL, progress=False)
    try:
        assert [m.split(":")[0] for m in caplog.messages if "done before" in m] == ["stage A (fit neurons)",
                                                                                    "generator fine-tune"]
        assert torch.equal(again.vectors_for(["Lo&o"]), grown[1].vectors_for(["Lo&o"]))
    finally:
        again.close()


def test_the_pack_keeps_its_pairs_embeddings_and_an_add_encodes_only_the_new_texts(setup, load, tmp_path, monkeypatch):
    edited = load(setup[3])
    table, encoder = edited.edits, edited.encoder
    for i in range(len(table)):  # float16 copies of the encoder's embeddings of the prompt, then each wording
        texts = [table.prompts[i], *table.wordings[i]]
        assert torch.allclose(table.embeddings[i], encoder.encode(texts, progress=False).float(), atol=2e-3)
    encoded = []
    original = encoder.encode

    def counting(texts, **kwargs):
        encoded.extend(texts)
        return original(texts, **kwargs)

    monkeypatch.setattr(encoder, "encode", counting)
    grown = add_edits(edited, NEW, tmp_path / "work", pool=POOL, progress=False)
    try:
        assert encoded and not set(encoded) & set(table.prompts) - {r.prompt for r in NEW}
        assert set(encoded) == {t for i in range(len(table), len(grown.edits))
                                for t in (grown.edits.prompts[i], *grown.edits.wordings[i])}
    finally:
        grown.close()


def test_a_pack_saved_without_embeddings_computes_them_when_edits_are_added(setup, load, tmp_path):
    folder = _without_embeddings(setup[3], tmp_path / "plain")
    edited = load(folder)
    assert all(e is None for e in edited.edits.embeddings)
    grown = add_edits(edited, NEW, tmp_path / "work", pool=POOL, progress=False)
    try:
        assert all(e is not None for e in grown.edits.embeddings)
        assert _answers(grown, [r.prompt for r in NEW]) == [r.target for r in NEW]
    finally:
        grown.close()


def test_an_embeddings_table_that_does_not_fit_the_edits_is_a_one_line_error(setup, load, tmp_path):
    folder = _without_embeddings(setup[3], tmp_path / "short", lambda t: {**t, "embeddings": t["embeddings"][1:]})
    with pytest.raises(MeGError, match=r"edits.safetensors: 'embeddings' has \d+ rows for 4 edits") as error:
        load(folder)
    assert "\n" not in str(error.value)


def test_embeddings_of_another_width_than_the_packs_encoder_are_a_one_line_error(setup, load, tmp_path):
    folder = _without_embeddings(setup[3], tmp_path / "narrow", lambda t: {**t, "embeddings": t["embeddings"][:, :5].contiguous()})
    with pytest.raises(MeGError, match=r"the edit table's embeddings are 5 wide, the pack's encoder's") as error:
        load(folder)
    assert "\n" not in str(error.value)


def _without_embeddings(pack, folder, change=lambda t: {k: t[k] for k in ("vectors", "fitted")}):
    """A copy of `pack` as version 3 packs were written before they kept the embeddings (or with
    its edit table's tensors changed otherwise), its manifest's checksums made to match."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(pack, folder)
    path = folder / "edits.safetensors"
    save_file(change(load_file(path)), path)
    manifest = json.loads((folder / "pack.json").read_text())
    manifest["files"]["edits.safetensors"] = file_sha256(path)
    manifest["manifest_sha256"] = manifest_sha256(manifest)
    (folder / "pack.json").write_text(json.dumps(manifest))
    return folder


def _old_pack(pack, folder):
    """A copy of `pack` as megedit wrote packs before they listed their edits (version 2)."""
    shutil.copytree(pack, folder)
    for name in ("edits.safetensors", "edits.json"):
        (folder / name).unlink()
    manifest = json.loads((folder / "pack.json").read_text())
    manifest.update(version=2, files={k: v for k, v in manifest["files"].items() if k in PACK_FILES})
    manifest.pop("history")
    manifest["manifest_sha256"] = manifest_sha256(manifest)
    (folder / "pack.json").write_text(json.dumps(manifest))
    return folder


def test_an_old_pack_without_the_edit_list_loads_and_names_edits_by_index(setup, load, tmp_path):
    edited = load(_old_pack(setup[3], tmp_path / "old"))
    assert edited.edits is None and edited.history == []
    assert edited.routing(["Kp7:", "Zed?", UNRELATED]).edits == ["0", "2", None]
    assert _answers(edited, ["Kp7:"]) == ["x"]
    with pytest.raises(ConfigError, match="^add: this pack does not list its edits"):
        add_edits(edited, NEW, tmp_path)


def _entropy_pack(load, pack, folder):
    """The pack with the paper's entropy router in place of the nearest one."""
    edited = load(pack)
    config = RouterConfig(kind="entropy", max_epochs=10, blocks=1)
    edited.router = Router.build(edited.encoder.encode([r.prompt for r in EDITS]), config, 0.5, progress=False)
    edited.save_pretrained(folder)
    edited.close()
    return folder


def test_an_entropy_router_pack_is_refused(setup, load, tmp_path):
    edited = load(_entropy_pack(load, setup[3], tmp_path / "entropy"))
    with pytest.raises(ConfigError, match="^remove: this pack's router is the entropy net"):
        remove_edits(edited, ["e0"], tmp_path)


# -- the verbs ----------------------------------------------------------------------------------


def test_add_and_remove_through_the_cli(setup, load, tmp_path):
    root, lm_dir, _, pack = setup
    data, pool = tmp_path / "new.jsonl", tmp_path / "pool.jsonl"
    data.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in NEW))
    pool.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in POOL))
    common = ["--model", lm_dir, "--device", "cpu", "--quiet"]
    out = _run("add", pack, "--data", f"jsonl:{data}", "--limit", 1, "--offset", 1, "--pseudo", f"jsonl:{pool}",
               "--out", tmp_path / "grown", *common)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("added 1 edits (0 replacing edits the pack held; fit success 100.0%): 4 -> 5 edits")
    out = _run("remove", tmp_path / "grown", "--ids", "e0, n1", "--out", tmp_path / "grown", *common)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("removed 2 edits: 5 -> 3 edits, generator 100 steps")
    assert [h["op"] for h in read_manifest(tmp_path / "grown")["history"]] == ["add", "remove"]
    edited = load(tmp_path / "grown")
    assert edited.edits.case_ids == ["e1", "e2", "e3"]
    assert edited.routing(["Lo&o", "Kp7:", "yyv:"]).edits == [None, None, "e3"]


def test_the_cli_refuses_bad_input_in_one_line(setup, load, tmp_path):
    _, lm_dir, _, pack = setup
    common = ["--model", lm_dir, "--device", "cpu", "--quiet"]
    line = _error_line("remove", pack, "--ids", "e1,nope", "--out", tmp_path / "p2", *common)
    assert line.startswith("megedit: error: remove: no edit with id 'nope' in the pack (its 4 ids: e0, e1, e2, e3)")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    line = _error_line("remove", pack, "--ids", "e1", "--out", tmp_path / "notes", *common)
    assert line == (f"megedit: error: {tmp_path / 'notes'}: folder is not empty and holds no megedit edit pack; "
                    f"refusing to replace it")
    entropy = _entropy_pack(load, pack, tmp_path / "entropy")
    data = tmp_path / "new.jsonl"
    data.write_text(json.dumps(NEW[0].to_dict()) + "\n")
    line = _error_line("add", entropy, "--data", f"jsonl:{data}", "--out", tmp_path / "p3", *common)
    assert line.startswith("megedit: error: add: this pack's router is the entropy net, which memorises its edit set")
    assert _error_line("add", pack, "--data", f"jsonl:{data}", "--out", tmp_path / "p4", "--passes", "-1", *common) == (
        "megedit: error: add config: passes must be > 0 or null, found -1.0")
