"""`megedit serve`: the OpenAI-compatible server, driven by the real OpenAI client against uvicorn
in a background thread, over a tiny pack fitted in-process; and the EditedModel pieces it uses
(routing, per-row vectors, batched chat, a streamer that takes a batch)."""

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import openai
import pytest
import torch
from test_editor import EDITS
from test_generation import CHAT_TEMPLATE, edited  # noqa: F401  (the module's tiny pack fixture)
from transformers.generation.streamers import BaseStreamer

import megedit.serve.batcher as batcher_module
from megedit.errors import ConfigError
from megedit.serve import create_app, in_thread
from megedit.serve.steps import Cohort, Sampling, pick

MODEL = "megedit/tiny"
BASE = f"{MODEL}-base"
UNRELATED = "zzzz"  # routed off: the base model answers it on either id


@pytest.fixture(scope="module")
def edit(edited):
    """(index, prompt, the edited answer, the base answer) of an edit that took."""
    prompts = [r.prompt for r in EDITS]
    after = edited.generate(prompts, 8, do_sample=False)
    with edited.unedited():
        before = edited.generate(prompts, 8, do_sample=False)
    k = next(i for i, r in enumerate(EDITS) if after[i] == r.target != before[i])
    return k, prompts[k], after[k], before[k]


@contextmanager
def serving(app):
    """The app on a free loopback port, in a thread; yields the base URL of its API."""
    with in_thread(app) as root:
        yield f"{root}/v1"


@pytest.fixture(scope="module")
def server(edited):
    app = create_app(edited, model_id=MODEL)
    with serving(app) as url:
        yield app, url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[1], api_key="unused", max_retries=0, timeout=60)


def _complete(client, prompt, model=MODEL, **kwargs):
    """The parsed completion and its X-Megedit-Edit header."""
    kwargs = {"max_tokens": 8, "temperature": 0, **kwargs}
    raw = client.completions.with_raw_response.create(model=model, prompt=prompt, **kwargs)
    return raw.parse(), raw.headers["x-megedit-edit"]


# -- the API ------------------------------------------------------------------------------------


def test_models_lists_the_edited_model_and_the_base_beside_it(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL, BASE]
    with urllib.request.urlopen(server[1].removesuffix("/v1") + "/healthz", timeout=10) as reply:
        assert json.load(reply)["status"] == "ok"


def test_a_completion_answers_the_edit_and_names_it(client, edit):
    k, prompt, after, before = edit
    out, header = _complete(client, prompt)
    choice = out.choices[0]
    assert choice.text == after and choice.finish_reason == "stop"
    case = EDITS[k].case_id  # the edit is named by its case id
    assert choice.megedit["edit_fired"] is True and choice.megedit["edit_id"] == case and header == case
    assert choice.megedit["distance"] == pytest.approx(0.0, abs=1e-4)  # an edit prompt is its own nearest
    out, header = _complete(client, prompt, model=BASE)
    assert out.choices[0].text == before and header == "none"
    assert out.choices[0].megedit == {"edit_fired": False, "edit_id": None, "distance": None}
    out, header = _complete(client, [prompt, UNRELATED])  # a list of prompts: a choice each
    assert [c.index for c in out.choices] == [0, 1] and out.choices[0].text == after
    assert out.choices[1].megedit["edit_fired"] is False and header == f"{case},none"


def test_a_chat_completion_routes_the_last_user_message(client, edited, edit, monkeypatch):
    k, prompt, _, _ = edit
    with pytest.raises(openai.BadRequestError, match="chat template"):  # the character tokenizer has none
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}])
    monkeypatch.setattr(edited.tokenizer, "chat_template", CHAT_TEMPLATE)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": prompt}]
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    out = raw.parse()
    expected = edited.chat(messages, 6, do_sample=False)  # the server is idle: the model is free
    assert out.choices[0].message.content == expected and out.choices[0].message.role == "assistant"
    assert out.choices[0].megedit["edit_id"] == EDITS[k].case_id == raw.headers["x-megedit-edit"]
    base = client.chat.completions.create(model=BASE, messages=messages, max_tokens=6, temperature=0)
    with edited.unedited():
        assert base.choices[0].message.content == edited.chat(messages, 6, do_sample=False)
    assert base.choices[0].megedit["edit_fired"] is False


def test_streamed_chunks_join_to_the_whole_text(client, edited, edit, monkeypatch):
    k, prompt, _, _ = edit
    for model, text in ((MODEL, prompt), (BASE, prompt), (MODEL, UNRELATED)):
        whole = client.completions.create(model=model, prompt=text, max_tokens=10, temperature=0)
        chunks = list(client.completions.create(model=model, prompt=text, max_tokens=10, temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
        assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
        assert all(c.choices[0].megedit == whole.choices[0].megedit for c in chunks)
    stop = whole.choices[0].text[3:5]  # the base model's babble on UNRELATED, cut at a stop string
    cut = client.completions.create(model=MODEL, prompt=UNRELATED, max_tokens=10, temperature=0, stop=[stop])
    streamed = client.completions.create(model=MODEL, prompt=UNRELATED, max_tokens=10, temperature=0, stop=stop,
                                         stream=True)
    assert cut.choices[0].text == whole.choices[0].text.split(stop)[0].strip()
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
    monkeypatch.setattr(edited.tokenizer, "chat_template", CHAT_TEMPLATE)
    messages = [{"role": "user", "content": prompt}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason is not None
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content


def test_sampling_with_a_seed_reproduces(client):
    runs = [_complete(client, UNRELATED, temperature=1.0, top_p=0.9, seed=7)[0].choices[0].text for _ in range(2)]
    assert runs[0] == runs[1] and runs[0]


def test_concurrent_requests_are_batched_and_each_row_keeps_its_routing(client, server, edit):
    k, prompt, after, _ = edit
    stats = server[0].state.batcher.stats
    batches, rows = stats["batches"], stats["rows"]
    jobs = [(MODEL if i % 2 else BASE, prompt if i % 4 < 2 else UNRELATED) for i in range(16)]
    start = threading.Barrier(len(jobs))

    def ask(job):
        start.wait()
        return _complete(client, job[1], model=job[0])

    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(ask, jobs))
    for (model, text), (out, header) in zip(jobs, replies):
        fired = model == MODEL and text == prompt
        assert out.choices[0].megedit["edit_fired"] is fired and header == (EDITS[k].case_id if fired else "none")
        assert (out.choices[0].text == after) is fired
    assert stats["rows"] - rows == len(jobs) and stats["batches"] - batches < len(jobs)  # some had several rows


def test_a_full_queue_answers_503_at_once(edited, monkeypatch):
    app = create_app(edited, model_id=MODEL, max_batch=1, max_queue=2)
    batcher, taken, gate = app.state.batcher, threading.Event(), threading.Event()
    join = batcher._join

    def slow(cohort, live, rows):  # the worker holds the first request's row until the gate opens
        taken.set()
        gate.wait(30)
        return join(cohort, live, rows)

    monkeypatch.setattr(batcher, "_join", slow)
    with serving(app) as url, ThreadPoolExecutor(3) as pool:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        first = pool.submit(_complete, client, UNRELATED)
        _wait_for(lambda: taken.is_set() and batcher.waiting == 0)  # the worker holds it
        queued = [pool.submit(_complete, client, UNRELATED) for _ in range(2)]
        _wait_for(lambda: batcher.waiting == 2)
        with pytest.raises(openai.APIStatusError) as refused:
            _complete(client, UNRELATED)
        gate.set()
        assert all(f.result()[0].choices[0].text for f in [first, *queued])
    assert refused.value.status_code == 503 and refused.value.body["code"] == "queue_full"
    assert batcher.stats["rejected"] == 1


def _wait_for(condition, timeout=20.0):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_an_api_key_is_required_when_set(edited):
    with serving(create_app(edited, model_id=MODEL, api_key="sekret")) as url:
        with pytest.raises(openai.AuthenticationError) as refused:
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        request = urllib.request.Request(f"{url}/models")  # no Authorization header at all
        with pytest.raises(urllib.error.HTTPError) as bare:
            urllib.request.urlopen(request, timeout=10)
        assert len(openai.OpenAI(base_url=url, api_key="sekret", max_retries=0).models.list().data) == 2
    assert refused.value.status_code == 401 and set(refused.value.body) == {"message", "type", "param", "code"}
    assert bare.value.code == 401 and set(json.load(bare.value)["error"]) == {"message", "type", "param", "code"}


def test_what_the_server_cannot_do_is_a_400_in_openais_shape(client):
    with pytest.raises(openai.BadRequestError) as several:
        client.completions.create(model=MODEL, prompt="a", n=2)
    assert several.value.body["param"] == "n" and "n=1" in several.value.body["message"]
    with pytest.raises(openai.NotFoundError, match="megedit/tiny-base"):
        client.completions.create(model="gpt-4", prompt="a")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt="a", max_tokens=500)  # the tiny model's context is 128
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="a", temperature=3)
    with pytest.raises(openai.BadRequestError, match="121 tokens long; the limit is 120"):
        client.completions.create(model=MODEL, prompt="x" * 121, max_tokens=8)  # no room left for the answer


# -- continuous batching -------------------------------------------------------------------------


def _slow_steps(monkeypatch, step_s=0.02, token=None):
    """Each decoding step takes `step_s` longer; with `token`, every row answers it until max_tokens."""
    step = Cohort.step

    def slow(self, tokens):
        time.sleep(step_s)
        return step(self, tokens)

    monkeypatch.setattr(Cohort, "step", slow)
    if token is not None:
        monkeypatch.setattr(batcher_module, "pick", lambda logits, sampling: token)


def test_rows_joined_and_dropped_mid_way_decode_as_they_would_alone(edited, edit):
    k, prompt, _, _ = edit
    ids = [edited.prompt_format.prompt_ids(p, edited.tokenizer) for p in (prompt, "zzzz zz zzz")]
    vectors = torch.stack([edited.routing([prompt]).vectors[0], torch.zeros(edited.spec.size)])

    def alone(i, steps):
        cohort, logits = Cohort.prefill(edited.model, edited.neuron, [ids[i]], vectors[i:i + 1], 0)
        out = [logits[0]]
        for _ in range(steps):
            out.append(cohort.step([int(out[-1].argmax())])[0])
        return out

    a, b = alone(0, 6), alone(1, 4)
    first, logits = Cohort.prefill(edited.model, edited.neuron, [ids[0]], vectors[:1], 0)
    got_a = [logits[0], first.step([int(a[0].argmax())])[0]]  # row 0 decodes alone for a step...
    second, logits = Cohort.prefill(edited.model, edited.neuron, [ids[1]], vectors[1:], 0)
    got_b = [logits[0]]
    first.join(second)  # ...then row 1 joins (prompts of other lengths: the caches are padded)
    for s in range(1, 4):
        both = first.step([int(a[s].argmax()), int(b[s - 1].argmax())])
        got_a.append(both[0])
        got_b.append(both[1])
    first.keep([0])  # row 1 leaves; row 0 goes on
    got_a += [first.step([int(a[s].argmax())])[0] for s in (4, 5)]
    for got, want in ((got_a, a), (got_b, b)):
        assert torch.allclose(torch.stack(got), torch.stack(want[: len(got)]), atol=1e-5)


def test_pick_is_greedy_at_zero_and_keeps_the_top_p_mass():
    logits = torch.tensor([0.0, 3.0, 2.9, -5.0])
    assert pick(logits, Sampling()) == 1
    draws = {pick(logits, Sampling(1.0, 0.5, torch.Generator().manual_seed(s))) for s in range(50)}
    assert draws == {1}  # token 1 alone holds over half the mass
    draws = {pick(logits, Sampling(1.0, 0.95, torch.Generator().manual_seed(s))) for s in range(200)}
    assert draws == {1, 2}  # 1 and 2 hold 97% of the mass: 0 (2.5%) and 3 are never drawn


def test_a_short_answer_does_not_wait_for_a_long_one(edited, monkeypatch):
    app = create_app(edited, model_id=MODEL)
    _slow_steps(monkeypatch, token=edited.tokenizer("a", add_special_tokens=False)["input_ids"][0])
    with serving(app) as url, ThreadPoolExecutor(2) as pool:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)

        def timed(max_tokens):
            out = client.completions.create(model=BASE, prompt=UNRELATED, max_tokens=max_tokens, temperature=0)
            return time.monotonic(), out.choices[0]

        long = pool.submit(timed, 100)  # 100 steps: about 2 s
        _wait_for(lambda: app.state.batcher.active == 1)
        short_done, short = timed(3)  # joins the running batch between two steps, leaves after 3
        assert not long.done()  # the long row is still decoding
        long_done, long = long.result()
    assert short.text == "aaa" and short.finish_reason == "length" and long.text == "a" * 100
    assert long_done - short_done > 0.5
    assert app.state.batcher.stats["largest_batch"] == 2 and app.state.batcher.stats["batches"] == 2


def test_a_row_joining_mid_way_keeps_its_own_neuron_vector(edited, edit, monkeypatch):
    k, prompt, after, before = edit
    app = create_app(edited, model_id=MODEL)
    calls = []
    routing = edited.routing
    monkeypatch.setattr(edited, "routing", lambda texts: calls.append(list(texts)) or routing(texts))
    _slow_steps(monkeypatch, step_s=0.05)
    with serving(app) as url, ThreadPoolExecutor(1) as pool:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        base = pool.submit(client.completions.create, model=BASE, prompt=prompt, max_tokens=30, temperature=0)
        _wait_for(lambda: app.state.batcher.active == 1)
        edited_out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
        base_out = base.result()
    assert edited_out.choices[0].text == after and edited_out.choices[0].megedit["edit_fired"] is True
    assert base_out.choices[0].text.startswith(before) and base_out.choices[0].megedit["edit_fired"] is False
    assert calls == [[prompt]]  # routed once, for the edited request only, however many steps it took


def test_a_stream_comes_token_by_token(edited, monkeypatch):
    app = create_app(edited, model_id=MODEL)
    _slow_steps(monkeypatch, step_s=0.03, token=edited.tokenizer("b", add_special_tokens=False)["input_ids"][0])
    with serving(app) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        arrivals = []
        for chunk in client.completions.create(model=MODEL, prompt=UNRELATED, max_tokens=20, temperature=0,
                                               stream=True):
            arrivals.append((time.monotonic(), chunk.choices[0].text))
    assert "".join(text for _, text in arrivals) == "b" * 20
    assert sum(text == "b" for _, text in arrivals) == 20 and arrivals[-1][0] - arrivals[0][0] > 0.3


# -- the command line ---------------------------------------------------------------------------


def _megedit(*args, code: str = "pass"):
    env = {k: v for k, v in os.environ.items() if k != "MEGEDIT_API_KEY"}
    script = f"import sys; {code}; from megedit.cli import main; sys.exit(main({list(args)!r}))"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)


def test_the_cli_refuses_a_public_host_without_a_key_in_one_line():
    out = _megedit("serve", "no-such-pack", "--host", "0.0.0.0")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert out.stderr.startswith("megedit: error: --host 0.0.0.0 is reachable from other machines: set an API key")
    out = _megedit("serve", "no-such-pack", code="sys.modules['fastapi'] = None")  # the extra not installed
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "pip install 'megedit[serve]'" in out.stderr


# -- the EditedModel pieces the server uses -----------------------------------------------------


def test_routing_names_the_nearest_edit_and_a_zero_vector_row_is_the_base_model(edited, edit):
    k, prompt, after, before = edit
    routing = edited.routing([r.prompt for r in EDITS] + [UNRELATED])
    assert routing.edits == ["e0", "e1", "e2", "e3", None] and routing.fired.tolist() == [True] * 4 + [False]
    assert torch.equal(routing.vectors, edited.vectors_for([r.prompt for r in EDITS] + [UNRELATED]))
    vectors = torch.stack([routing.vectors[k], torch.zeros(edited.spec.size)])
    assert edited.generate([prompt, prompt], 8, vectors=vectors) == [after, before]
    with pytest.raises(ConfigError, match=r"vectors must have shape \(2, "):
        edited.generate([prompt, prompt], 8, vectors=vectors[:1])


class Collect(BaseStreamer):
    def __init__(self):
        self.puts = []

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        pass


def test_chat_takes_a_batch_and_a_streamer_of_ones_own_sees_every_row(edited, edit, monkeypatch):
    k, prompt, after, _ = edit
    monkeypatch.setattr(edited.tokenizer, "chat_template", CHAT_TEMPLATE)
    single = [edited.chat(m, 5, do_sample=False) for m in (prompt, UNRELATED)]
    assert edited.chat([prompt, [{"role": "user", "content": UNRELATED}]], 5, do_sample=False) == single
    streamer = Collect()
    assert edited.generate([prompt, UNRELATED], 6, do_sample=False, streamer=streamer)[0] == after
    # the two prompts first, then a token per row each step
    assert len(streamer.puts[0]) == 2 and all(len(step) == 2 for step in streamer.puts[1:])
