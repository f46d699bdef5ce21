"""One table of the architectures megedit can edit, keyed by `config.model_type`.

Everything model-specific that the rest of the code needs (where the decoder layers are, which
attribute of a layer is its MLP, whether the MLP is gated, where its activation lives) is a row
here; no other module branches on the architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import ConfigError, UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    layers_path: str  # dotted path from the CausalLM to the ModuleList of decoder layers
    mlp_attr: str  # attribute of one decoder layer holding its feed-forward block
    act_attr: str  # attribute of the MLP holding its activation module
    gated: bool  # gated (SwiGLU/GeGLU) MLP or a plain two-matrix MLP
    out_attr: str = "down_proj"  # attribute of the MLP holding its output projection (MEMIT edits it)


_LLAMA_LIKE = ArchSpec("model.layers", "mlp", "act_fn", gated=True)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,  # Llama 2/3, SmolLM2
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": ArchSpec("model.layers", "mlp", "activation_fn", gated=True),
    "phi": ArchSpec("model.layers", "mlp", "activation_fn", gated=False, out_attr="fc2"),
    "gpt2": ArchSpec("transformer.h", "mlp", "act", gated=False, out_attr="c_proj"),  # a Conv1D: weight (in, out)
    "gptj": ArchSpec("transformer.h", "mlp", "act", gated=False, out_attr="fc_out"),
    "gpt_neox": ArchSpec("gpt_neox.layers", "mlp", "act", gated=False, out_attr="dense_4h_to_h"),
}


def arch_spec(model: nn.Module) -> ArchSpec:
    """The table row for `model`, or an error that lists what is supported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(arch_spec(model).layers_path)


def layer_stack_path(model: nn.Module) -> str:
    """Dotted path to the ModuleList of transformer layers: the table's row for the LMs we edit;
    for other models (the sentence encoder) the ModuleList holding `config.num_hidden_layers`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type].layers_path
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return name
    raise UnsupportedArchitectureError(f"model_type {model_type!r}: no ModuleList of {n} layers found")


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def hidden_size(model: nn.Module) -> int:
    return int(model.config.hidden_size)


def default_layer(model: nn.Module) -> int:
    """Where the neuron goes unless told: 80% of the depth (layer 24 of SmolLM2's 30, the best
    generality with full success in the layer sweep recorded in the README). Sweep other models."""
    return int(0.8 * num_layers(model))


def resolve_layer(model: nn.Module, layer: int | None) -> int:
    return default_layer(model) if layer is None else check_layer(model, layer)


def check_layer(model: nn.Module, layer: int) -> int:
    n = num_layers(model)
    if not isinstance(layer, int) or not 0 <= layer < n:
        raise ConfigError(f"layer must be an integer in [0, {n - 1}] for this model, found {layer!r}")
    return layer


def mlp_path(model: nn.Module, layer: int) -> str:
    """Dotted module path of the MLP of decoder layer `layer` (0-based)."""
    spec = arch_spec(model)
    return f"{spec.layers_path}.{check_layer(model, layer)}.{spec.mlp_attr}"


def mlp_out_path(model: nn.Module, layer: int) -> str:
    """Dotted module path of the output projection of layer `layer`'s MLP."""
    return f"{mlp_path(model, layer)}.{arch_spec(model).out_attr}"


def mlp_activation(mlp: nn.Module, spec: ArchSpec) -> nn.Module:
    return getattr(mlp, spec.act_attr)
