"""EditedModel.generate with HF generation arguments, chat, routed direct calls and the
prompt-length limit, on a tiny random LM fitted in-process."""

import pytest
import torch
from test_editor import EDITS, POOL, _config, _lm
from tiny import tiny_encoder
from transformers import LogitsProcessor, LogitsProcessorList, TextIteratorStreamer, TextStreamer

from megedit import MeGEditor
from megedit.errors import ConfigError, MeGError
from megedit.lm import check_prompt_lengths

PROMPTS = [EDITS[0].prompt, "zzzz", EDITS[1].prompt, EDITS[2].prompt]
CHAT_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}<eos>{% endfor %}"
                 "{% if add_generation_prompt %}[assistant]{% endif %}")


@pytest.fixture(scope="module")
def edited(tmp_path_factory):
    model, tok = _lm()
    edited = MeGEditor(model, tok, _config(), encoder=tiny_encoder(), progress=False).fit(
        EDITS, tmp_path_factory.mktemp("work"), POOL)
    yield edited
    edited.close()


class Script(LogitsProcessor):
    """Forces the given tokens one per step and records the prompt it was first shown."""

    def __init__(self, tokens):
        self.tokens, self.prompts = tokens, []

    def __call__(self, input_ids, scores):
        if not self.prompts:
            self.prompts = input_ids.tolist()
        step = len(self.prompts[0]) and input_ids.shape[1] - len(self.prompts[0])
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.tokens[min(step, len(self.tokens) - 1)]] = 0
        return forced


def test_the_default_call_is_the_harness_greedy_decoder_and_hf_greedy_agrees(edited):
    from megedit.runtime.decoding import DecodeSettings, run_queries
    from megedit.runtime.subject import Query

    ids = [edited.prompt_format.prompt_ids(p, edited.tokenizer) for p in PROMPTS]
    out = run_queries(edited, [Query("", "generate", p, None) for p in PROMPTS], ids, [[] for _ in PROMPTS],
                      DecodeSettings(edited.prompt_format, 6, 32), progress=False, desc="x")
    harness = [edited.tokenizer.decode(g, skip_special_tokens=True).strip() for g in out.generated]
    assert edited.generate(PROMPTS, max_new_tokens=6) == harness
    assert edited.generate(PROMPTS, max_new_tokens=6, do_sample=False) == harness
    with edited.unedited():
        base = edited.generate(PROMPTS, max_new_tokens=6)
    assert base[1] == harness[1] and base != harness  # "zzzz" is routed off; the edits change answers


def test_sampling_with_a_seed_is_reproducible_and_leaves_the_global_rng_alone(edited):
    state = torch.get_rng_state()
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=3.0, top_k=50, top_p=0.95,
                  eos_token_id=edited.tokenizer.eos_token_id)
    first = edited.generate(PROMPTS, seed=1, **kwargs)
    assert edited.generate(PROMPTS, seed=1, **kwargs) == first
    others = [edited.generate(PROMPTS, seed=s, **kwargs) for s in (2, 3)]
    assert any(o != first for o in others)
    assert first != edited.generate(PROMPTS, max_new_tokens=8, eos_token_id=edited.tokenizer.eos_token_id)
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ConfigError, match="seed must be an integer"):
        edited.generate(PROMPTS, seed="1", **kwargs)


def test_beams_keep_each_rows_vector(edited):
    kwargs = dict(max_new_tokens=6, num_beams=2, eos_token_id=edited.tokenizer.eos_token_id)
    batched = edited.generate(PROMPTS, **kwargs)
    assert batched == [edited.generate(p, **kwargs)[0] for p in PROMPTS]
    with edited.unedited():
        base = edited.generate(PROMPTS, **kwargs)
    assert base[1] == batched[1] and base != batched  # the vectors are on, per row
    several = edited.generate(PROMPTS, num_return_sequences=2, **kwargs)
    assert [len(s) for s in several] == [2] * len(PROMPTS) and [s[0] for s in several] == batched
    assert len({tuple(s) for s in several}) > 1  # prompts do not share one vector
    repeated = edited.generate(PROMPTS, max_new_tokens=6, repetition_penalty=1.3, num_beams=3, batch_size=3)
    assert repeated == [edited.generate(p, max_new_tokens=6, repetition_penalty=1.3, num_beams=3)[0] for p in PROMPTS]


def test_stop_strings_end_the_answer(edited):
    eos = edited.tokenizer.eos_token_id
    full = edited.generate(PROMPTS[1], max_new_tokens=8, eos_token_id=eos)[0]  # the base model's long answer
    assert len(full) >= 4
    stop = full[1:3]
    stopped = edited.generate(PROMPTS[1], max_new_tokens=8, eos_token_id=eos, stop_strings=[stop])[0]
    assert stopped == full[: full.index(stop) + len(stop)] != full


def test_return_dict_in_generate_gives_hfs_output(edited):
    out = edited.generate(PROMPTS[:2], max_new_tokens=4, return_dict_in_generate=True, output_scores=True)
    width = out.sequences.shape[1] - len(out.scores)  # the prompts, left-padded, in the order given
    for row, prompt, text in zip(out.sequences.tolist(), PROMPTS, edited.generate(PROMPTS[:2], max_new_tokens=4)):
        assert edited.tokenizer.decode(row[:width], skip_special_tokens=True) == prompt
        assert edited.tokenizer.decode(row[width:], skip_special_tokens=True).split("\n")[0].strip() == text


def test_a_streamer_receives_the_text(edited, capsys):
    streamer = TextIteratorStreamer(edited.tokenizer, skip_prompt=True, skip_special_tokens=True)
    answer = edited.generate(EDITS[0].prompt, max_new_tokens=6, streamer=streamer)[0]
    assert answer and "".join(streamer).strip() == answer
    capsys.readouterr()
    printed = TextStreamer(edited.tokenizer, skip_prompt=True, skip_special_tokens=True)  # the answer ends with EOS
    assert edited.generate(EDITS[0].prompt, max_new_tokens=6, streamer=printed) == [answer]
    assert capsys.readouterr().out.strip() == answer
    with pytest.raises(ConfigError, match="a streamer takes one prompt at a time, found 2"):
        edited.generate(PROMPTS[:2], streamer=TextIteratorStreamer(edited.tokenizer))


def test_chat_renders_the_conversation_routes_the_last_user_message_and_stops_at_end_of_turn(edited, monkeypatch):
    tok = edited.tokenizer
    monkeypatch.setattr(tok, "chat_template", CHAT_TEMPLATE)
    routed = []
    vectors_for = edited.vectors_for
    monkeypatch.setattr(edited, "vectors_for", lambda texts: routed.append(list(texts)) or vectors_for(texts))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": EDITS[0].prompt}]
    script = Script(tok.convert_tokens_to_ids(list("x\ny")) + [tok.eos_token_id] + tok.convert_tokens_to_ids(["z"]))
    reply = edited.chat(messages, max_new_tokens=10, logits_processor=LogitsProcessorList([script]))
    assert reply == "x\ny"  # past the newline, up to the end-of-turn token
    assert routed == [[EDITS[0].prompt]]
    assert tok.decode(script.prompts[0]) == f"[user]hi<eos>[assistant]yo<eos>[user]{EDITS[0].prompt}<eos>[assistant]"
    plain = edited.chat(EDITS[0].prompt, max_new_tokens=4)
    assert plain == edited.chat([{"role": "user", "content": EDITS[0].prompt}], max_new_tokens=4)
    with edited.routed([EDITS[0].prompt]) as model:  # the wrapped model called directly, routed
        ids = torch.tensor([tok(f"[user]{EDITS[0].prompt}<eos>[assistant]", add_special_tokens=False)["input_ids"]])
        direct = model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=0)
    assert tok.decode(direct[0, ids.shape[1]:], skip_special_tokens=True).strip() == plain


def test_chat_refuses_what_it_cannot_render(edited, monkeypatch):
    with pytest.raises(ConfigError, match="chat template"):
        edited.chat("hello")  # the character tokenizer has none
    monkeypatch.setattr(edited.tokenizer, "chat_template", CHAT_TEMPLATE)
    with pytest.raises(ConfigError, match="ends with a user message"):
        edited.chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(ConfigError, match="list of"):
        edited.chat([{"role": "user"}])


def test_a_prompt_past_the_context_is_refused_in_one_line_before_any_work(edited, monkeypatch):
    queries = edited.stats["queries"]
    with pytest.raises(MeGError, match=r"^prompt 1 is 200 tokens long; the limit is 128 tokens") as error:
        edited.generate(["ok", "x" * 200], max_new_tokens=2)
    assert "\n" not in str(error.value) and edited.stats["queries"] == queries  # nothing was routed or run
    with pytest.raises(MeGError, match="prompt 0 is 5 tokens long; the limit is 4"):
        edited.generate(["abcde"], max_prompt_tokens=4, do_sample=True)
    monkeypatch.setattr(edited, "max_prompt_tokens", 3)
    with pytest.raises(MeGError, match="prompt 0 is 4 tokens long; the limit is 3"):
        edited.generate("abcd")
    monkeypatch.setattr(edited.tokenizer, "chat_template", CHAT_TEMPLATE)
    with pytest.raises(MeGError, match="prompt 0 is 19 tokens long; the limit is 3"):
        edited.chat("a")  # the rendered template is what counts
    assert edited.generate("abc", max_new_tokens=1) == edited.generate("abc", max_new_tokens=1, max_prompt_tokens=128)
    with pytest.raises(MeGError, match="edit e7 is 3 tokens long; the limit is 2"):
        check_prompt_lengths([[1], [1, 2, 3]], 2, names=["edit e1", "edit e7"])


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer, found 0"),
    (dict(max_new_tokens=-1, do_sample=True), "max_new_tokens must be a positive integer, found -1"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be a positive integer, found 2.5"),
    (dict(batch_size=0), "batch_size must be a positive integer, found 0"),
    (dict(max_prompt_tokens=0), "max_prompt_tokens must be a positive integer, found 0"),
])
def test_bad_generation_settings_are_one_line_errors(edited, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        edited.generate(PROMPTS, **kwargs)
