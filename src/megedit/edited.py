"""EditedModel: the base LM, untouched, plus MeG's added parts (encoder, router, generator and
the dynamic neuron), and edit packs (`save_pretrained` / `from_pretrained`).

For each batch of queries: embed the raw query text, route (unfamiliar queries keep the zero
vector, so the generator never runs for them and the model is exactly the base model), sample a
neuron vector for the familiar ones, apply the vectors per batch row, decode.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from .data.prompts import PRESETS, PromptFormat, get_format
from .errors import ConfigError, MeGError
from .eval.subject import NeuronSubject, Query
from .io import atomic_write_json, parse_text
from .models import SentenceEncoder, model_fingerprint
from .neuron import NeuronSpec, attach_neuron
from .stages.encoder import load_encoder_delta, write_encoder_delta
from .stages.generator import Generator
from .stages.router import Router

log = logging.getLogger(__name__)

PACK_FORMAT, PACK_VERSION = "megedit-pack", 2  # 2: pack.json holds its own checksum
PACK_FILES = ("encoder.safetensors", "encoder.json", "router.safetensors", "router.json",
              "generator.safetensors", "generator.json")


class EditedModel(NeuronSubject):
    """A base model edited by MeG. Use it like the model: `generate`, `chat`, `evaluate(edited, ...)`;
    `edited.enabled = False` (or `with edited.unedited():`) gives back the exact base model."""

    method = "meg"

    def __init__(self, model, tokenizer, spec: NeuronSpec, encoder: SentenceEncoder, encoder_record: dict,
                 router: Router, generator: Generator, *, prompt_format: str | PromptFormat = "raw",
                 config: dict | None = None, record: dict | None = None, sample_seed: int = 0,
                 fingerprint: str | None = None) -> None:
        self.fingerprint = fingerprint or model_fingerprint(model)
        super().__init__(model, tokenizer, attach_neuron(model, spec.layer, spec.variant),
                         lambda queries: self.vectors_for([q.text for q in queries]), "meg")
        self.spec, self.encoder, self.encoder_record = spec, encoder, encoder_record
        self.router, self.generator = router, generator
        self.prompt_format = get_format(prompt_format)
        self.config, self.record, self.sample_seed = config or {}, record or {}, sample_seed
        self.stats = {"queries": 0, "familiar": 0, "route_s": 0.0, "generate_s": 0.0}

    # -- the per-query neuron ------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self.neuron.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.neuron.enabled = value

    @torch.no_grad()
    def route(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(embeddings, router distance, familiar) for raw query texts."""
        emb = self.encoder.encode(list(texts))
        distance = self.router.distance(emb)
        return emb, distance.cpu(), (distance < self.router.epsilon).cpu()

    @torch.no_grad()
    def vectors_for(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, size) neuron vectors: generated for familiar queries, zero for the rest."""
        start = time.perf_counter()
        emb, _, familiar = self.route(texts)
        routed = time.perf_counter()
        out = torch.zeros(len(texts), self.spec.size)
        if familiar.any():
            out[familiar] = self.generator.generate(emb[familiar.to(emb.device)], seed=self.sample_seed).cpu()
        self.stats["queries"] += len(texts)
        self.stats["familiar"] += int(familiar.sum())
        self.stats["route_s"] += routed - start
        self.stats["generate_s"] += time.perf_counter() - routed
        return out

    def describe(self) -> dict:
        return {"method": "meg", "spec": self.spec.to_dict(), "epsilon": self.router.epsilon,
                "router": self.router.config.kind, "generator": self.generator.config.kind,
                "sample_steps": self.generator.config.sample_steps, "sampler": self.generator.config.sampler,
                "sample_seed": self.sample_seed, "encoder": self.encoder_record.get("base_encoder"),
                "query_text": "raw queries (no LM wrapping) for the encoder and the router",
                "config": self.config}

    # -- use -----------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[str] | str, max_new_tokens: int = 20, batch_size: int = 32,
                 prompt_format: str | PromptFormat | None = None) -> list[str]:
        """Greedy answers (up to the first newline) for raw prompts, wrapped in the pack's format."""
        from .eval.runner import DecodeSettings, run_queries

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        fmt = get_format(prompt_format or self.prompt_format)
        queries = [Query("", "generate", p, None) for p in prompts]
        ids = [fmt.prompt_ids(p, self.tokenizer) for p in prompts]
        with torch.inference_mode():
            out = run_queries(self, queries, ids, [[] for _ in prompts], DecodeSettings(fmt, max_new_tokens, batch_size),
                              progress=False, desc="generating")
        return [self.tokenizer.decode(g, skip_special_tokens=True).strip() for g in out.generated]

    def chat(self, message: str, max_new_tokens: int = 48) -> str:
        """One user turn through the tokenizer's chat template; the router sees the message itself."""
        return self.generate([message], max_new_tokens, prompt_format=PRESETS["chat"])[0]

    # -- edit packs ----------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the added parts only (never the base weights) to `directory`, atomically:
        the folder is complete or absent (an existing pack there is replaced whole)."""
        import transformers

        from . import __version__

        directory = Path(directory)
        check_pack_target(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
        try:
            write_encoder_delta(self.encoder, self.encoder_record, tmp / "encoder.safetensors")
            self.router.save(tmp / "router.safetensors")
            self.generator.save(tmp / "generator.safetensors")
            manifest = {
                "format": PACK_FORMAT, "version": PACK_VERSION,
                "base_model": {"fingerprint": self.fingerprint, "model_type": self.model.config.model_type,
                               "source": getattr(self.model, "megedit_source", None) or self.model.config._name_or_path},
                "spec": self.spec.to_dict(), "prompt_format": self.prompt_format.to_dict(),
                "sample_seed": self.sample_seed, "epsilon": self.router.epsilon, "config": self.config,
                "record": self.record, "files": {name: _sha256(tmp / name) for name in PACK_FILES},
                "versions": {"megedit": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
            }
            atomic_write_json(tmp / "pack.json", {**manifest, "manifest_sha256": manifest_sha256(manifest)})
            _replace_dir(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("saved edit pack to %s", directory)
        return directory

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
            if _sha256(directory / name) != digest:
                raise MeGError(f"{directory / name}: corrupt or changed since the pack was written (checksum mismatch)")
        tuned, encoder_record = load_encoder_delta(directory / "encoder.safetensors", encoder)
        generator = Generator.load(directory / "generator.safetensors")
        spec, fmt = _spec_and_format(directory / "pack.json", manifest, generator)
        device = next(model.parameters()).device
        return cls(model, tokenizer, spec, tuned.to(device), encoder_record,
                   Router.load(directory / "router.safetensors"), generator.to(device),
                   prompt_format=fmt, config=manifest.get("config", {}), record=manifest.get("record", {}),
                   sample_seed=manifest.get("sample_seed", 0), fingerprint=fingerprint)

    def close(self) -> None:
        """Take the neuron off the model (the model object is then the plain base model again)."""
        self.neuron.detach()


def read_manifest(directory: Path) -> dict:
    """pack.json of an edit pack, checked for the fields a pack must have."""
    path = directory / "pack.json"
    if not directory.is_dir():
        raise MeGError(f"{directory}: no such edit pack folder")
    try:
        manifest = parse_text(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise MeGError(f"{path}: not a readable edit pack manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != PACK_FORMAT:
        raise MeGError(f"{path}: not a megedit edit pack (format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if manifest.get("version") != PACK_VERSION:
        raise MeGError(f"{path}: pack version {manifest.get('version')!r}; this megedit reads version {PACK_VERSION}")
    if manifest.get("manifest_sha256") != manifest_sha256(manifest):  # a hand edit would load and answer wrongly
        raise MeGError(f"{path}: changed since the pack was written (its checksum does not match its content)")
    missing = [k for k in ("base_model", "spec", "prompt_format", "files") if k not in manifest]
    if missing or set(manifest.get("files", {})) != set(PACK_FILES):
        raise MeGError(f"{path}: incomplete manifest (missing {missing or 'file checksums'})")
    if type(manifest.get("sample_seed", 0)) is not int:  # not a bool, a float or a string either
        raise MeGError(f"{path}: sample_seed must be an integer, found {manifest['sample_seed']!r}")
    return manifest


def manifest_sha256(manifest: dict) -> str:
    """Checksum of pack.json's content (all but this checksum), as JSON reads it back, keys sorted."""
    content = json.loads(json.dumps({k: v for k, v in manifest.items() if k != "manifest_sha256"}))
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as error:
        raise MeGError(f"{path}: missing from the edit pack ({error.strerror})") from None


def check_pack_target(directory: str | Path) -> None:
    """Refuse a destination that holds anything but a megedit pack: only an absent path, an empty
    folder or an earlier pack (recognised by its pack.json) may be replaced. A folder that another
    writer swaps while it is looked at is looked at again."""
    directory = Path(directory)
    for _ in range(20):
        try:
            before = directory.lstat().st_ino
        except FileNotFoundError:
            return
        verdict = _pack_target_problem(directory)
        try:
            swapped = directory.lstat().st_ino != before
        except FileNotFoundError:
            swapped = True
        if verdict is None or not swapped:
            break
    if verdict is not None:
        raise MeGError(f"{directory}: {verdict}; refusing to replace it")


def _pack_target_problem(directory: Path) -> str | None:
    if directory.is_symlink() or not directory.is_dir():
        return "exists and is not an edit pack folder"
    try:
        if not any(directory.iterdir()):
            return None
        manifest = parse_text((directory / "pack.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != PACK_FORMAT:
        return "folder is not empty and holds no megedit edit pack"
    return None


def _replace_dir(tmp: Path, directory: Path, tries: int = 50) -> None:
    """Move the finished `tmp` folder to `directory`; an old pack there is removed only after.
    Concurrent writers race on the renames: each retries until its folder is in place, so the
    last one wins and every reader sees one whole pack."""
    for _ in range(tries):
        old = None
        if directory.exists():
            check_pack_target(directory)
            old = directory.with_name(f".{directory.name}.old-{time.time_ns()}")
            try:
                directory.rename(old)
            except FileNotFoundError:  # another writer moved it first
                continue
        try:
            tmp.rename(directory)
            return
        except OSError:  # another writer's folder arrived in between: try again
            continue
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    raise MeGError(f"{directory}: could not put the pack in place ({tries} concurrent writers in the way)")
