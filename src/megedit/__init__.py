"""megedit: massive knowledge editing of language models with MeG (generated dynamic neurons).

Importing this package is cheap and has no side effects: the public names below are loaded
from their modules on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load_model": "models",
    "load_encoder": "models",
    "model_fingerprint": "models",
    "SentenceEncoder": "models",
    "attach_neuron": "neuron",
    "DynamicNeuron": "neuron",
    "NeuronSpec": "neuron",
    "EditRequest": "data",
    "LocalityQuery": "data",
    "load_requests": "data",
    "PromptFormat": "data.prompts",
    "evaluate": "eval",
    "MeGConfig": "config",
    "MeGEditor": "editor",
    "EditedModel": "edited",
    "add_edits": "living",
    "remove_edits": "living",
    "AddConfig": "living",
    "EvalReport": "eval",
    "MeGError": "errors",
    "ConfigError": "errors",
    "DataError": "errors",
    "ModelLoadError": "errors",
    "UnsupportedArchitectureError": "errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'megedit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
