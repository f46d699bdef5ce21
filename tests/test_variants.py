"""Other wordings of an edit: how they are built, fitted with one shared vector, and paired with
the edit's vector for the generator; the lookup generator and the budget in passes."""

import pytest
import torch
from test_editor import _config
from test_generator import _pairs
from tiny import char_tokenizer, tiny_encoder, tiny_model

from megedit import MeGEditor
from megedit.data import EditRequest
from megedit.data.prompts import PromptFormat
from megedit.errors import ConfigError, MeGError
from megedit.neuron import attach_neuron
from megedit.stages.fit_config import WORDING_SCHEDULES, FitConfig
from megedit.stages.fit_neurons import fit_neurons
from megedit.stages.fit_rows import length_groups, row_loss_and_success
from megedit.stages.generator import Generator, GeneratorConfig, train_generator
from megedit.stages.variants import (build_variants, context_prefixes, excluded_templates, paraphrase_templates,
                                     rephrase_template)

FMT = PromptFormat("raw")


def _cf(case, subject, prompt, rephrase):
    return EditRequest(case, prompt.format(subject), "x", subject=subject, rephrases=(rephrase.format(subject),))


POOL_CF = [_cf("p1", "Ann Lee", "The mother tongue of {} is", "{} spoke the language"),
           _cf("p2", "Bo Chen", "The mother tongue of {} is", "Some text here. {} spoke the language"),
           _cf("p3", "Cy Dee", "The mother tongue of {} is", "{} is a native speaker of"),
           _cf("p4", "Di Eve", "The mother tongue of {} is", "{} is a native speaker of"),
           _cf("p5", "Ed Fox", "The mother tongue of {} is", "Where {} lives, people say"),
           _cf("p6", "Fa Gu", "{} plays for", "{} is a member of the team"),
           _cf("p7", "Go Hu", "{} plays for", "{} is a member of the team")]


def test_wordings_come_from_pool_records_of_the_same_relation_wording_minus_context_and_one_offs():
    assert rephrase_template("References\n\nCategory:X. Ann Lee spoke the language", "Ann Lee") == "{} spoke the language"
    assert rephrase_template("no subject here", "Ann Lee") is None
    templates = paraphrase_templates(POOL_CF)
    # "Where {} lives" appears once: a one-off wording is left out
    assert templates == {"The mother tongue of {} is": ["{} is a native speaker of", "{} spoke the language"],
                         "{} plays for": ["{} is a member of the team"]}
    edit = _cf("e1", "Zo Yu", "The mother tongue of {} is", "{} is a native speaker of")
    no_subject = EditRequest("e2", "Who wrote Hamlet?", "x")
    variants = build_variants([edit, no_subject], POOL_CF, ["Once upon a time."], 5, 1)
    assert variants[0] == ("Zo Yu is a native speaker of", "Zo Yu spoke the language",
                           "Once upon a time. The mother tongue of Zo Yu is")
    assert variants[1] == ("Once upon a time. Who wrote Hamlet?",)  # prefixes only
    # lone prefixes go to an edit with no paraphrase alone, and never lower `prefixes`
    prefixes = ["Once upon a time.", "It was late."]
    lone = build_variants([edit, no_subject], POOL_CF, prefixes, 5, 0, n_lone_prefixes=2)
    assert lone[0] == ("Zo Yu is a native speaker of", "Zo Yu spoke the language")
    assert sorted(lone[1]) == sorted(f"{p} Who wrote Hamlet?" for p in prefixes)
    assert len(build_variants([no_subject], POOL_CF, prefixes, 5, 2, n_lone_prefixes=1)[0]) == 2


def test_the_benchmark_switch_leaves_out_the_evaluated_rephrases_wordings():
    edits = [_cf("e1", "Zo Yu", "The mother tongue of {} is", "{} is a native speaker of"),
             _cf("e2", "Xi Wu", "The mother tongue of {} is", "{} spoke the language")]
    assert excluded_templates(edits, "own") == [{"{} is a native speaker of"}, {"{} spoke the language"}]
    assert build_variants(edits, POOL_CF, [], 5, 0, exclude="own") == [("Zo Yu spoke the language",),
                                                                      ("Xi Wu is a native speaker of",)]
    assert build_variants(edits, POOL_CF, [], 5, 0, exclude="all") == [(), ()]
    with pytest.raises(ConfigError, match="exclude_eval_templates"):
        excluded_templates(edits, "some")
    # pool records that are edits themselves never lend a wording
    assert build_variants([POOL_CF[0]], POOL_CF[:2], [], 5, 0) == [()]


def test_context_prefixes_are_seeded_sentences():
    model, tok = tiny_model("llama", init_range=0.2), char_tokenizer()
    a = context_prefixes(model, tok, 4, tokens=6, seed=1)
    assert a == context_prefixes(model, tok, 4, tokens=6, seed=1) and len(a) == 4
    assert all(p.endswith((".", "!", "?")) and "\n" not in p for p in a)
    assert a[0].startswith("The") and a[1].startswith("In")


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", init_range=0.2), char_tokenizer()


def _fit_config(**kw):
    return FitConfig(**{"layer": 1, "batch_size": 3, "max_steps": 40, "lr": 0.1, "margin": 0.0, **kw})


REQUESTS = [EditRequest(str(i), f"q{i}:", "ab"[i % 2]) for i in range(5)]
VARIANTS = [("Q0:", "x. q0:"), (), ("q2 ?",), ("z3:", "y3:", "w3:"), ("Q4:",)]


@pytest.mark.parametrize("schedule", WORDING_SCHEDULES)
def test_a_batch_with_wordings_equals_fitting_each_edit_alone_with_them(lm, schedule):
    model, tok = lm
    config = _fit_config(wording_schedule=schedule)
    batched = fit_neurons(model, tok, REQUESTS, FMT, config, progress=False, variants=VARIANTS)
    alone = [fit_neurons(model, tok, [r], FMT, _fit_config(batch_size=1, wording_schedule=schedule), progress=False,
                         variants=[v])
             for r, v in zip(REQUESTS, VARIANTS)]
    torch.testing.assert_close(batched.vectors, torch.cat([a.vectors for a in alone]), atol=1e-4, rtol=1e-4)
    assert batched.steps.tolist() == [int(a.steps) for a in alone]
    assert batched.wordings.tolist() == [1 + len(v) for v in VARIANTS]
    # not a vacuous equality: with every wording trained some of these tiny edits fit; the prompt first
    # fits none of them in 40 steps here, but its prompts pass and the other wordings get tested
    assert bool(batched.success.any()) if schedule == "all" else batched.timing["tested_rows"] > 0
    # an edit with no other wording is fitted exactly as a prompt-only fit fits it
    prompt_only = fit_neurons(model, tok, [REQUESTS[1]], FMT, config, progress=False)
    torch.testing.assert_close(batched.vectors[1:2], prompt_only.vectors, atol=1e-4, rtol=1e-4)
    assert bool(batched.success[1]) == bool(prompt_only.success[0])


def test_rows_split_by_length_into_several_passes_fit_as_one_padded_pass(lm, monkeypatch):
    from megedit.stages import fit_neurons as stage

    model, tok = lm
    one_pass = fit_neurons(model, tok, REQUESTS, FMT, _fit_config(), progress=False, variants=VARIANTS)
    monkeypatch.setattr(stage._FitState, "MIN_GROUP_ROWS", 1)  # a pass per distinct length
    passes = []
    original = stage._FitState._rows_forward
    monkeypatch.setattr(stage._FitState, "_rows_forward", lambda self, *a: passes.append(1) or original(self, *a))
    split = fit_neurons(model, tok, REQUESTS, FMT, _fit_config(), progress=False, variants=VARIANTS)
    assert len(passes) > int(split.steps.max()) + 1  # more than one pass per step
    torch.testing.assert_close(split.vectors, one_pass.vectors, atol=1e-4, rtol=1e-4)
    assert torch.equal(split.steps, one_pass.steps) and torch.equal(split.success, one_pass.success)


def test_length_groups_hold_at_least_the_minimum_and_end_where_the_length_changes():
    lengths = [5, 3, 3, 9, 5, 3, 7, 7]
    groups = length_groups(lengths, 2)
    assert sorted(i for g in groups for i in g) == list(range(8))
    assert [[lengths[i] for i in g] for g in groups] == [[3, 3, 3], [5, 5], [7, 7, 9]]
    assert length_groups(lengths, 100) == [sorted(range(8), key=lambda i: lengths[i])]


@pytest.mark.parametrize("schedule", WORDING_SCHEDULES)
def test_an_edit_is_done_when_every_wording_passes_with_its_one_vector(lm, schedule):
    model, tok = lm
    result = fit_neurons(model, tok, REQUESTS, FMT, _fit_config(wording_schedule=schedule), progress=False,
                         variants=VARIANTS)
    neuron = attach_neuron(model, 1)
    try:
        for i, (r, v) in enumerate(zip(REQUESTS, VARIANTS)):
            answer = FMT.answer_ids(r.target, tok, with_stop=True)
            passed = []
            for text in (r.prompt, *v):
                prompt = FMT.prompt_ids(text, tok)
                neuron.set_weights(result.vectors[i : i + 1])
                logits = model(input_ids=torch.tensor([prompt + answer])).logits[:, -len(answer) - 1 :]
                passed.append(bool(row_loss_and_success(logits, torch.tensor([answer + [-100]]), 0.0)[1]))
            assert sum(passed) / len(passed) == pytest.approx(float(result.wordings_ok[i]), abs=1e-6)
            if result.steps[i] < 40:  # stopped early: every wording passed
                assert all(passed)
            assert bool(result.success[i]) == passed[0]
    finally:
        neuron.detach()


def test_prompt_first_trains_the_prompt_alone_until_it_passes_then_each_wording_found_failing_too(lm, monkeypatch):
    from megedit.stages import fit_neurons as stage

    model, tok = lm
    calls = []
    original = stage._FitState._rows_outcome
    monkeypatch.setattr(stage._FitState, "_rows_outcome",
                        lambda self, n, edits, pairs, *a, train: calls.append((train, [(edits[k], j) for k, j in pairs]))
                        or original(self, n, edits, pairs, *a, train=train))
    config = _fit_config(wording_schedule="prompt-first", max_steps=60)
    result = fit_neurons(model, tok, REQUESTS[:1], FMT, config, progress=False, variants=[("x. q0:",)])
    calls = [c for c in calls if c[1]]
    first_test = next(k for k, (train, _) in enumerate(calls) if not train)
    assert all(pairs == [(0, 0)] for _, pairs in calls[:first_test])  # the prompt alone until it passes
    assert calls[first_test][1] == [(0, 1)]  # tested once the prompt passed, failed, and trains from then on
    assert all(pairs == [(0, 0), (0, 1)] for _, pairs in calls[first_test + 1 :])
    assert bool(result.success[0]) and float(result.wordings_ok[0]) == 1.0 and int(result.steps[0]) < 60


def test_the_editor_fits_wordings_and_pairs_each_with_its_edits_vector(tmp_path):
    model, tok = tiny_model("llama", init_range=1.0), char_tokenizer()  # random tiny LMs fit few edits
    edits = [EditRequest(f"e{i}", f"q{i}:", "ab"[i % 2], subject=f"q{i}", rephrases=(f"q{i} :",)) for i in range(4)]
    pool = [EditRequest(f"p{i}", f"w{i}:", "c", subject=f"w{i}", rephrases=(f"w{i}=",)) for i in range(12)]
    config = _config(kind="lookup")
    config.fit = FitConfig(batch_size=4, max_steps=60, lr=0.5, margin=0.0, paraphrases=2)
    editor = MeGEditor(model, tok, config, encoder=tiny_encoder(), progress=False)
    edited = editor.fit(edits, tmp_path, pool)
    try:
        variants, record = editor.variants(edits, pool)
        assert variants == [(f"q{i}=",) for i in range(4)]  # the pool's wording "{}=" of the prompt wording "{}:"
        assert record["mean_wordings"] == 2 and record["edits_with_paraphrases"] == 4
        fit = edited.record["fit"]
        assert fit["mean_wordings"] == 2 and fit["success_rate"] > 0
        ok = round(fit["n"] * fit["success_rate"] / 100)
        assert edited.generator.record["n_pairs"] == 2 * ok and edited.generator.record["n_edits"] == ok
        # the lookup table maps each fitted edit's other wording to the same vector as its prompt
        assert torch.equal(edited.generator.generate(edited.encoder.encode([v[0] for v in variants])),
                           edited.generator.generate(edited.encoder.encode([r.prompt for r in edits])))
    finally:
        edited.close()


def test_the_lookup_generator_returns_the_nearest_conditions_vector_and_round_trips(tmp_path):
    cond, vectors = _pairs(6)
    generator = train_generator(cond, vectors, GeneratorConfig(kind="lookup"), progress=False)
    torch.testing.assert_close(generator.generate(cond), vectors, atol=1e-5, rtol=1e-5)
    near = cond + 0.01 * torch.randn(cond.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(generator.generate(near), vectors, atol=1e-5, rtol=1e-5)
    assert generator.record["best"]["rel_l2"] < 1e-5 and generator.record["steps"] == 0
    loaded = Generator.load(generator.save(tmp_path / "g.safetensors"))
    assert torch.equal(loaded.generate(near), generator.generate(near))



def test_the_lookup_table_keeps_each_vector_once_and_reads_tables_of_before(tmp_path):
    from safetensors.torch import load_file, save_file

    cond, vectors = _pairs(6)
    wordings = torch.cat([cond, cond + 0.01])  # two wordings per edit, one vector each
    generator = train_generator(wordings, torch.cat([vectors, vectors]), GeneratorConfig(kind="lookup"), progress=False)
    assert generator.net.values.shape[0] == 6 and generator.net.keys.shape[0] == 12
    torch.testing.assert_close(generator.generate(wordings[6:]), vectors, atol=1e-5, rtol=1e-5)
    path = generator.save(tmp_path / "g.safetensors")
    # a file of before: one vector per key, no index
    tensors = load_file(path)
    tensors["net.values"] = tensors.pop("net.values")[tensors.pop("net.index")]
    save_file(tensors, path)
    torch.testing.assert_close(Generator.load(path).generate(wordings), torch.cat([vectors, vectors]), atol=1e-5, rtol=1e-5)
    tensors["net.index"] = torch.full((12,), 99)  # rows that are not there
    save_file(tensors, path)
    with pytest.raises(MeGError, match="lookup generator table is inconsistent"):
        Generator.load(path)


def test_the_budget_in_passes_grows_with_the_edits():
    config = GeneratorConfig(kind="mlp", passes=10, batch_size=32)
    assert config.steps_for(64) == 20 and config.steps_for(640) == 200
    assert GeneratorConfig(kind="mlp", train_steps=7, passes=None).steps_for(640) == 7
    with pytest.raises(ConfigError, match="passes"):
        GeneratorConfig(passes=0).validate()
    cond, vectors = _pairs(8)
    config = GeneratorConfig(kind="mlp", passes=8, batch_size=4, validate_every=16, mlp={"hidden": 16, "depth": 1})
    # 16 pairs from 8 edits (two wordings each): 8 passes over the edits are 16 steps of 4
    generator = train_generator(torch.cat([cond, cond]), torch.cat([vectors, vectors]), config, n_edits=8,
                                progress=False)
    assert generator.record["steps"] == 16 and generator.record["n_pairs"] == 16
