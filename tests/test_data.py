import dataclasses
import json

import pytest

from megedit.data import EditRequest, LocalityQuery, count_records, load_requests, parse_data_arg
from megedit.data.loaders import clean_nq_question
from megedit.data.prompts import PRESETS, get_format
from megedit.errors import ConfigError, DataError

CF = {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
      "subject": "Danielle Darrieux", "ground_truth": "French",
      "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
      "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"}
ROME = {"case_id": 7, "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                                            "target_new": {"str": "English"}, "target_true": {"str": "French"}},
        "paraphrase_prompts": ["Danielle Darrieux speaks", "Darrieux's language is"],
        "neighborhood_prompts": ["Michel Rocard is a native speaker of", "Jean Gabin speaks"]}
ZSRE = {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "pred": "uniform",
        "rephrase": "What will be the product of UniFirst?", "alt": "unmanned aircraft", "answers": ["uniform"],
        "loc": "nq question: john goodman's character in the big lebowski", "loc_ans": "Walter Sobchak"}


def _write(tmp_path, records, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def test_easyedit_counterfact(tmp_path):
    (r,) = load_requests("counterfact", _write(tmp_path, [CF]))
    assert r == EditRequest("0", CF["prompt"], "English", "Danielle Darrieux", "French",
                            (CF["rephrase_prompt"],), (LocalityQuery(CF["locality_prompt"], "French"),))


def test_rome_counterfact_substitutes_the_subject_and_is_auto_detected(tmp_path):
    path = _write(tmp_path, [ROME])
    for kind in ("rome", "counterfact"):
        (r,) = load_requests(kind, path)
        assert r.prompt == "The mother tongue of Danielle Darrieux is"
        assert r.case_id == "7" and r.target == "English" and r.ground_truth == "French"
        assert r.rephrases == tuple(ROME["paraphrase_prompts"])
        assert [q.prompt for q in r.locality] == ROME["neighborhood_prompts"]
        assert all(q.answer == "French" for q in r.locality)


def test_mend_zsre_cleans_the_nq_locality_question(tmp_path):
    (r,) = load_requests("zsre", _write(tmp_path, [ZSRE]))
    assert (r.prompt, r.target, r.ground_truth) == (ZSRE["src"], "unmanned aircraft", "uniform")
    assert r.locality == (LocalityQuery("John goodman's character in the big lebowski?", "Walter Sobchak"),)
    assert clean_nq_question("nq question: who is it?") == "Who is it?"


def test_own_jsonl_round_trips(tmp_path):
    original = EditRequest("a1", "Q?", "A", rephrases=("Q2?",), locality=(LocalityQuery("L?", "x"), LocalityQuery("M?")))
    path = tmp_path / "edits.jsonl"
    path.write_text(json.dumps(original.to_dict()) + "\n\n")
    assert load_requests("jsonl", path) == [original]


def test_limit_and_offset_select_a_slice(tmp_path):
    records = [dict(CF, case_id=i) for i in range(5)]
    path = _write(tmp_path, records)
    assert [r.case_id for r in load_requests("counterfact", path, limit=2, offset=1)] == ["1", "2"]
    assert len(load_requests("counterfact", path, limit=50)) == 5
    assert count_records("counterfact", path) == 5


def test_the_pool_after_the_edits_is_none_when_they_take_the_whole_file(tmp_path):
    """A CLI pool defaults to the records after the edited ones; edits that reach the file's end leave none,
    and the library's fallback pool serves (it used to stop with 'no usable records in range 5..5')."""
    from types import SimpleNamespace

    from megedit.cli.common import load_pool

    path = _write(tmp_path, [dict(CF, case_id=i) for i in range(5)])
    args = SimpleNamespace(pseudo=None, specificity_pool=None, skip_invalid=False, offset=0, limit=3)
    name, pool = load_pool(args, "counterfact", path, option="specificity_pool")
    assert name == "counterfact:data.json records 3.." and [r.case_id for r in pool] == ["3", "4"]
    for offset, limit in ((0, 5), (2, 3), (0, 50)):
        assert load_pool(SimpleNamespace(**{**vars(args), "offset": offset, "limit": limit}), "counterfact", path) \
            == ("none", [])


@pytest.mark.parametrize("records, kind, message", [
    ("not json", "counterfact", r"data.json: not valid JSON \(line 1 column 1"),
    ({"a": 1}, "counterfact", r"data.json: expected a JSON list of records, found dict"),
    ([CF, dict(CF, case_id=1, target_new="")], "counterfact",
     r"data.json: record 1: field 'target_new': expected a non-empty string, found an empty string"),
    ([{k: v for k, v in CF.items() if k != "prompt"}], "counterfact", r"data.json: record 0: field 'prompt': missing"),
    ([dict(CF, prompt=42)], "counterfact", r"record 0: field 'prompt': expected a non-empty string, found int 42"),
    ([CF, CF], "counterfact", r"record 1: field 'case_id': duplicate id '0' \(first used by record 0\)"),
    ([dict(CF, case_id=[1])], "counterfact", r"record 0: field 'case_id': expected an integer or a non-empty string"),
    ([dict(ZSRE, rephrase=["ok", 3])], "zsre", r"record 0: field 'rephrase': expected a string or a list of non-empty"),
    ([{"requested_rewrite": dict(ROME["requested_rewrite"], prompt="no slot")}], "rome",
     r"record 0: field 'requested_rewrite.prompt': expected a '\{\}' where the subject goes"),
    ([{"requested_rewrite": {"prompt": "{} is", "subject": "X"}}], "rome",
     r"record 0: field 'requested_rewrite.target_new.str': missing"),
    (["just a string"], "zsre", r"data.json: record 0: expected a JSON object, found str"),
])
def test_bad_input_names_file_record_and_field(tmp_path, records, kind, message):
    path = tmp_path / "data.json"
    path.write_text(records if isinstance(records, str) else json.dumps(records))
    with pytest.raises(DataError, match=message):
        load_requests(kind, path)


def test_bad_jsonl_line_and_locality_item(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text('{"prompt": "p", "target": "t"}\n{oops\n')
    with pytest.raises(DataError, match=r"e.jsonl: line 2: not valid JSON"):
        load_requests("jsonl", path)
    path.write_text('{"prompt": "p", "target": "t", "locality": [{"answer": "x"}]}\n')
    with pytest.raises(DataError, match=r"e.jsonl: record 0: field 'locality\[0\]': expected a string or"):
        load_requests("jsonl", path)


def test_missing_file_unknown_kind_and_bad_data_argument(tmp_path):
    with pytest.raises(DataError, match=r"nope.json: no such file"):
        load_requests("zsre", tmp_path / "nope.json")
    with pytest.raises(DataError, match=r"unknown data kind 'csv'; expected one of counterfact, rome, zsre, jsonl"):
        load_requests("csv", tmp_path / "x")
    with pytest.raises(DataError, match=r"--data must be KIND:PATH"):
        parse_data_arg("counterfact.json")
    assert parse_data_arg("zsre:/a/b.json")[0] == "zsre"


def test_invalid_records_can_be_skipped_with_a_warning(tmp_path, caplog):
    path = _write(tmp_path, [CF, dict(CF, case_id=1, target_new=" "), dict(CF, case_id=2)])
    assert [r.case_id for r in load_requests("counterfact", path, skip_invalid=True)] == ["0", "2"]
    assert "skipped 1 invalid record(s): data.json: record 1: field 'target_new'" in caplog.text


def test_shared_data_files_load(shared_data):
    cf = load_requests("counterfact", shared_data / "counterfact/counterfact-edit.json")
    assert len(cf) == 10_000
    zsre = shared_data / "zsre/zsre_mend_train-1k.json"
    with pytest.raises(DataError, match="record 534: field 'alt': expected a non-empty string"):
        load_requests("zsre", zsre)  # two MEND records have an empty target
    zs = load_requests("zsre", zsre, skip_invalid=True)
    assert len(zs) == 998
    assert all(r.rephrases and r.locality for r in cf + zs)
    assert zs[0].locality[0].prompt == "John goodman's character in the big lebowski?"


class _CharTokenizer:
    """One token per character; id 0 is padding, id 1 end of turn."""
    eos_token_id = 1

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_prompt_formats_wrap_queries_and_answers():
    tok = _CharTokenizer()
    raw, qa, chat = PRESETS["raw"], PRESETS["qa"], PRESETS["chat"]
    assert raw.prompt_ids("Hi", tok) == [ord("H"), ord("i")]
    assert qa.text("Who?", tok) == "Answer the following question in less than 5 words: Who? \nAnswer:"
    assert raw.answer_ids("Ab", tok) == [ord(" "), ord("A"), ord("b")]
    assert raw.answer_ids("A", tok, with_stop=True) == [ord(" "), ord("A"), 1]  # trained answers end with EOS
    newline = dataclasses.replace(raw, stop="newline")
    assert newline.answer_ids("A", tok, with_stop=True) == [ord(" "), ord("A"), ord("\n")]
    with pytest.raises(ConfigError, match="stop must be 'newline' or 'eos', found 'tab'"):
        dataclasses.replace(raw, stop="tab")
    assert chat.text("Q", tok) == "<user>Q<assistant>"
    assert dataclasses.replace(chat, system="").text("Q", tok) == "<system><user>Q<assistant>"  # not the default
    assert chat.answer_ids("A", tok, with_stop=True) == [ord("A"), 1]
    with pytest.raises(ConfigError, match="unknown prompt format 'fancy'"):
        get_format("fancy")
