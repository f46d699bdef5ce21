"""EditedModel: the base LM, untouched, plus MeG's added parts (encoder, router, generator and
the dynamic neuron), and edit packs (`save_pretrained` / `from_pretrained`).

For each batch of queries: embed the raw query text, route (unfamiliar queries keep the zero
vector, so the generator never runs for them and the model is exactly the base model), sample a
neuron vector for the familiar ones, then hand the vectors to the runtime (runtime/), which applies
them per batch row and decodes.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import transformers
from torch import nn

from . import __version__
from .data.prompts import PromptFormat, get_format, stop_tokens
from .edit_table import EDIT_FILES, EditTable
from .errors import ConfigError, MeGError
from .lm import check_prompt_lengths, end_of_turn_ids, model_device, prompt_limit
from .models import SentenceEncoder, model_fingerprint
from .neuron import NeuronSpec
from .pack import (PACK_FILES, PACK_FORMAT, PACK_VERSION, check_pack_target, pack_file_sha256,  # noqa: F401
                   manifest_sha256, read_manifest, write_pack)  # check_pack_target, manifest_sha256: re-exported
from .runtime.conversation import chat_prompt_ids, conversation, is_batch
from .runtime.decoding import greedy_answers
from .runtime.generation import check_row_vectors, generate_answers, streamer_batch_size
from .runtime.subject import NeuronSubject, Query, attach_spec
from .stages.encoder import load_encoder_delta, write_encoder_delta
from .stages.generator import Generator
from .stages.question_gate import QuestionGate
from .stages.router import Router

log = logging.getLogger(__name__)


@dataclass
class Routing:
    """How a batch of raw queries was routed (`EditedModel.routing`), per query: its neuron vector
    (zero where no edit fires), the router's distance, whether an edit fires, and which one: the
    case id of the edit whose prompt is nearest to the query (a pack from before packs listed
    their edits gives its index in fit order, as a string). The "entropy" router knows
    familiarity, not which edit, so there `edits` holds None throughout."""

    vectors: torch.Tensor  # (B, size), on the CPU
    distance: torch.Tensor  # (B,)
    fired: torch.Tensor  # (B,) bool
    edits: list[str | None]  # None where no edit fires or the router cannot name one


class EditedModel(NeuronSubject):
    """A base model edited by MeG. Use it like the model: `generate`, `chat`, `evaluate(edited, ...)`;
    `edited.enabled = False` (or `with edited.unedited():`) gives back the exact base model.
    `edited.model` called directly is the base model (its neuron has no vectors) except inside
    `with edited.routed(texts):`. Prompts longer than `max_prompt_tokens` (None: the model's
    context) are refused. `edits`: the edits it holds, in the router's order (what adding and
    removing edits needs; None for a pack from before packs listed them); `history`: the
    additions and removals since the fit. Adding and removing edits fit, so they live on the
    fitting side: `megedit.add_edits(edited, ...)`, `megedit.remove_edits(edited, ...)` (living.py)."""

    method = "meg"

    def __init__(self, model, tokenizer, spec: NeuronSpec, encoder: SentenceEncoder, encoder_record: dict,
                 router: Router, generator: Generator, *, prompt_format: str | PromptFormat = "raw",
                 config: dict | None = None, record: dict | None = None, sample_seed: int = 0,
                 fingerprint: str | None = None, edits: EditTable | None = None,
                 history: list[dict] | None = None) -> None:
        self.fingerprint = fingerprint or model_fingerprint(model)
        super().__init__(model, tokenizer, attach_spec(model, tokenizer, spec, get_format(prompt_format)),
                         lambda queries: self.vectors_for([q.text for q in queries]), "meg")
        self.spec, self.encoder, self.encoder_record = spec, encoder, encoder_record
        self.router, self.generator = router, generator
        self.prompt_format = get_format(prompt_format)
        self.config, self.record, self.sample_seed = config or {}, record or {}, sample_seed
        self.edits, self.history = edits, list(history or [])
        self.gate = _question_gate(encoder, router, edits)
        self.stats = {"queries": 0, "familiar": 0, "route_s": 0.0, "generate_s": 0.0}
        self.max_prompt_tokens: int | None = None

    # -- the per-query neuron ------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self.neuron.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.neuron.enabled = value

    @torch.no_grad()
    def route(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(embeddings, router distance, familiar) for raw query texts; a query the question gate
        holds back (stages/question_gate.py) is not familiar."""
        return self.route_to_edits(texts)[:3]

    def route_to_edits(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                            list[int | None]]:
        """`route`, with each query's nearest edit row (None for the entropy router), from one search."""
        emb = self.encoder.encode(list(texts))
        distance, familiar, nearest = self.router.route_to_edits(emb)
        if self.gate is not None and familiar.any():
            fired = familiar.nonzero().flatten().tolist()
            for i, ok in zip(fired, self.gate.passes([texts[i] for i in fired], [nearest[i] for i in fired])):
                familiar[i] = ok
        return emb, distance, familiar, nearest

    @torch.no_grad()
    def vectors_for(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, size) neuron vectors: generated for familiar queries, zero for the rest."""
        return self.routing(texts).vectors

    @torch.no_grad()
    def routing(self, texts: Sequence[str]) -> Routing:
        """The neuron vectors of raw queries (as `vectors_for`) with the routing behind them: the
        distances, which queries fire an edit and which edit (see `Routing`)."""
        start = time.perf_counter()
        emb, distance, familiar, nearest = self.route_to_edits(texts)
        routed = time.perf_counter()
        out = torch.zeros(len(texts), self.spec.size)
        if familiar.any():
            out[familiar] = self.generator.generate(emb[familiar.to(emb.device)], seed=self.sample_seed).cpu()
        self.stats["queries"] += len(texts)
        self.stats["familiar"] += int(familiar.sum())
        self.stats["route_s"] += routed - start
        self.stats["generate_s"] += time.perf_counter() - routed
        ids = self.edits.case_ids if self.edits is not None else None
        named = [None if i is None else ids[i] if ids is not None else str(i) for i in nearest]
        return Routing(out, distance, familiar, [e if f else None for e, f in zip(named, familiar.tolist())])

    def unchanged(self, queries: Sequence[Query]) -> list[bool]:
        """The queries the router turns away (their neuron vector is zero), without generating
        the vectors of the others."""
        return (~self.route([q.text for q in queries])[2]).tolist()

    def describe(self) -> dict:
        return {"method": "meg", "spec": self.spec.to_dict(), "epsilon": self.router.epsilon,
                "router": self.router.config.kind, "generator": self.generator.config.kind,
                "sample_steps": self.generator.config.sample_steps, "sampler": self.generator.config.sampler,
                "sample_seed": self.sample_seed, "encoder": self.encoder_record.get("base_encoder"),
                "query_text": "raw queries (no LM wrapping) for the encoder and the router",
                "config": self.config}

    # -- use -----------------------------------------------------------------------------------

    @contextmanager
    def routed(self, texts: Sequence[str]) -> Iterator[nn.Module]:
        """Inside the block the wrapped model, called directly (forward or HF `generate`), is the
        edited model for a batch whose rows are `texts` (raw queries, in order; beams and return
        sequences follow their row). Yields the model."""
        with self.neuron.applied(self.vectors_for(list(texts)).to(model_device(self.model))):
            yield self.model

    def generate(self, prompts: Sequence[str] | str, max_new_tokens: int = 20, batch_size: int = 32,
                 prompt_format: str | PromptFormat | None = None, *, max_prompt_tokens: int | None = None,
                 seed: int | None = None, vectors: torch.Tensor | None = None, **generation_kwargs) -> list:
        """Answers for raw prompts, wrapped in the pack's format, each routed on its own text.

        With no generation arguments: greedy decoding up to the first newline (the harness's own
        decoder). With any argument of HF `generate()` (do_sample, temperature, top_p, top_k,
        num_beams, num_return_sequences, repetition_penalty, stop_strings, eos_token_id, streamer,
        generation_config, ...) HF's generate runs (greedy unless do_sample=True), each prompt's
        neuron vector following its rows; answers still end at a newline (the end-of-turn token
        for chat formats) unless `eos_token_id` or `generation_config` says otherwise. `seed` makes sampling reproducible
        without touching the global RNG. Returns one text per prompt, a list of texts per prompt
        when num_return_sequences > 1, or HF's output as is with return_dict_in_generate=True
        (all prompts in one batch). Prompts longer than `max_prompt_tokens` (default: the
        attribute, else the model's context) are refused.

        `vectors` (one row per prompt, e.g. `routing(texts).vectors`) replaces the routing: a zero
        row runs that prompt on the exact base model while the others stay edited (HF's generate
        runs). A streamer of HF's TextStreamer family takes one prompt; another `BaseStreamer` gets
        every prompt's row in one batch: put() with the (rows, width) prompts, then (rows,) tokens."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise ConfigError(f"prompts must be strings, found {[type(p).__name__ for p in prompts]}")
        _check_count("max_new_tokens", max_new_tokens)
        _check_count("batch_size", batch_size)
        fmt = get_format(prompt_format or self.prompt_format)
        ids = [fmt.prompt_ids(p, self.tokenizer) for p in prompts]
        self._check_prompts(ids, max_prompt_tokens)
        if not generation_kwargs and vectors is None:  # the harness's own decoder
            return greedy_answers(self, prompts, ids, fmt, max_new_tokens, batch_size)
        return self._hf_generate(prompts, ids, self.answer_end_ids(fmt), max_new_tokens, batch_size, seed,
                                 generation_kwargs, vectors)

    def chat(self, messages: str | Sequence[dict] | Sequence[str | Sequence[dict]], max_new_tokens: int = 48, *,
             max_prompt_tokens: int | None = None, seed: int | None = None, vectors: torch.Tensor | None = None,
             **generation_kwargs):
        """The assistant's reply to one user message (a string) or a conversation (a list of
        {"role", "content"} ending with a user turn), through the tokenizer's chat template, up to
        the end-of-turn token (not the first newline). The router sees the last user message's
        text, as edits are routed on their raw query. Takes generate()'s generation arguments
        (`vectors` included: one row per conversation). A list of conversations (each a string or
        a message list) gives a list of replies, the conversations run as one batch."""
        _check_count("max_new_tokens", max_new_tokens)
        batch = is_batch(messages)
        conversations = [conversation(m, self.prompt_format) for m in (messages if batch else [messages])]
        ids = [chat_prompt_ids(self.tokenizer, c) for c in conversations]
        self._check_prompts(ids, max_prompt_tokens)
        out = self._hf_generate([c[-1]["content"] for c in conversations], ids, self.end_of_turn_ids(),
                                max_new_tokens, len(ids), seed, generation_kwargs, vectors)
        return out if batch or generation_kwargs.get("return_dict_in_generate") else out[0]

    def answer_end_ids(self, prompt_format: str | PromptFormat | None = None) -> list[int]:
        """Tokens that end generate()'s answers under a prompt format (default: the pack's):
        the end-of-turn tokens for chat formats, else EOS and every token holding a newline."""
        fmt = get_format(prompt_format or self.prompt_format)
        return self.end_of_turn_ids() if fmt.chat else sorted(stop_tokens(self.tokenizer))

    def end_of_turn_ids(self) -> list[int]:
        """Tokens that end an assistant turn (lm.end_of_turn_ids)."""
        return end_of_turn_ids(self.model, self.tokenizer)

    def _check_prompts(self, ids: list[list[int]], max_prompt_tokens: int | None) -> None:
        limit = max_prompt_tokens if max_prompt_tokens is not None else self.max_prompt_tokens
        check_prompt_lengths(ids, prompt_limit(self.model, limit))

    def _hf_generate(self, texts: list[str], ids: list[list[int]], stops: list[int], max_new_tokens: int,
                     batch_size: int, seed: int | None, kwargs: dict, vectors: torch.Tensor | None = None):
        """HF generate() on prompt token ids (runtime/generation.py), the neuron routed on `texts`
        (one per prompt) unless `vectors` gives each prompt's vector."""
        batch_size = streamer_batch_size(kwargs, len(ids), batch_size)
        check_row_vectors(vectors, len(ids), self.spec.size)
        if ids and vectors is None:
            vectors = self.vectors_for(texts)
        return generate_answers(self.model, self.tokenizer, self.neuron, ids, vectors, stops, max_new_tokens,
                                batch_size, seed, kwargs)

    # -- edit packs ----------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the added parts only (never the base weights) to `directory`, atomically:
        the folder is complete or absent (an existing pack there is replaced whole)."""

        def write(folder: Path) -> list[str]:
            write_encoder_delta(self.encoder, self.encoder_record, folder / "encoder.safetensors")
            self.router.save(folder / "router.safetensors")
            self.generator.save(folder / "generator.safetensors")
            if self.edits is not None:
                self.edits.save(folder)
            return [*PACK_FILES, *(EDIT_FILES if self.edits is not None else ())]

        manifest = {
            "format": PACK_FORMAT, "version": PACK_VERSION,
            "base_model": {"fingerprint": self.fingerprint, "model_type": self.model.config.model_type,
                           "source": getattr(self.model, "megedit_source", None) or self.model.config._name_or_path,
                           "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch.")},
            "spec": self.spec.to_dict(), "prompt_format": self.prompt_format.to_dict(),
            "sample_seed": self.sample_seed, "epsilon": self.router.epsilon, "config": self.config,
            "record": self.record, "history": self.history,
            "versions": {"megedit": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        }
        write_pack(Path(directory), manifest, write)
        log.info("saved edit pack to %s", directory)
        return Path(directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, model, tokenizer, *, encoder: SentenceEncoder | None = None,
                        check_base: bool = True) -> "EditedModel":
        """Load a pack onto `model` (the same base model it was made on; checked by fingerprint
        unless `check_base=False`). The encoder's base is loaded from the pack's record unless given."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        fingerprint = model_fingerprint(model)
        expected = manifest["base_model"]
        if check_base and fingerprint != expected["fingerprint"]:
            raise MeGError(f"{directory}: this pack was made for another base model ({expected['source']}, "
                           f"fingerprint {expected['fingerprint'][:12]}); the model given has fingerprint "
                           f"{fingerprint[:12]}")
        for name, digest in manifest["files"].items():
            if pack_file_sha256(directory / name) != digest:
                raise MeGError(f"{directory / name}: corrupt or changed since the pack was written (checksum mismatch)")
        tuned, encoder_record = load_encoder_delta(directory / "encoder.safetensors", encoder)
        generator = Generator.load(directory / "generator.safetensors")
        spec, fmt = _spec_and_format(directory / "pack.json", manifest, generator)
        router = Router.load(directory / "router.safetensors")
        edits = _edit_table(directory, manifest, spec, router)
        device = next(model.parameters()).device
        return cls(model, tokenizer, spec, tuned.to(device), encoder_record, router, generator.to(device),
                   prompt_format=fmt, config=manifest.get("config", {}), record=manifest.get("record", {}),
                   sample_seed=manifest.get("sample_seed", 0), fingerprint=fingerprint, edits=edits,
                   history=manifest.get("history", []))

    def close(self) -> None:
        """Take the neuron off the model (the model object is then the plain base model again)."""
        self.neuron.detach()


def _check_count(name: str, value) -> None:
    if type(value) is not int or value < 1:  # not a bool or a float either
        raise ConfigError(f"{name} must be a positive integer, found {value!r}")


def _edit_table(directory: Path, manifest: dict, spec: NeuronSpec, router: Router) -> EditTable | None:
    """The pack's edit table (None for a pack from before packs listed their edits); it must name
    one edit per row of a nearest router's bank and hold vectors of the neuron's size."""
    if EDIT_FILES[0] not in manifest["files"]:
        return None
    table = EditTable.load(directory)
    rows = None if router.bank is None else len(router.bank)
    if table.vectors.shape[1] != spec.size or rows not in (None, len(table)):
        raise MeGError(f"{directory}: the edit table ({len(table)} edits, vectors of length {table.vectors.shape[1]}) "
                       f"does not match the pack (router bank of {rows} edits, neuron vectors of length {spec.size})")
    widths = {e.shape[1] for e in table.embeddings if e is not None}
    if router.bank is not None and widths - {router.bank.shape[1]}:  # both are the pack encoder's embeddings
        raise MeGError(f"{directory}: the edit table's embeddings are {max(widths)} wide, the pack's encoder's "
                       f"(its router's bank) {router.bank.shape[1]}")
    return table


def _spec_and_format(path: Path, manifest: dict, generator: Generator) -> tuple[NeuronSpec, PromptFormat]:
    """The pack's neuron spec and prompt format; the spec must fit the generator's vectors."""
    try:
        spec = NeuronSpec(**manifest["spec"])
        fmt = PromptFormat(**manifest["prompt_format"])
    except (TypeError, ConfigError) as error:
        raise MeGError(f"{path}: malformed spec or prompt_format ({error})") from None
    if spec.size != generator.length:
        raise MeGError(f"{path}: the spec ({spec.variant} neuron, hidden size {spec.hidden}) takes vectors of length "
                       f"{spec.size}, the generator makes vectors of length {generator.length}")
    return spec, fmt


def _question_gate(encoder: SentenceEncoder, router: Router, edits: EditTable | None) -> QuestionGate | None:
    """The question gate of a nearest router whose edits' subjects are known, or None."""
    threshold = getattr(router.config, "question_gate", None)
    if threshold is None or router.bank is None or edits is None or not any(edits.subjects):
        return None
    return QuestionGate(encoder, edits.subjects, edits.prompts, edits.wordings, threshold,
                        router.config.question_gate_lone)
