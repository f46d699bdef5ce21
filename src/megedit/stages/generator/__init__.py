"""Stage D: the weight generator (query embedding -> neuron vector).

diffusion.py  the schedule, v-prediction, DDIM and ancestral samplers (no network inside)
dit.py        the Diffusion Transformer over 1-D vectors, with size presets
mlp.py        the plain MLP alternative
lookup.py     no network: the nearest training condition's vector (what learning adds is measured against it)
kinds.py      the registry: each kind's name -> its code (network, sampling, saving), defined beside its network
model.py      Generator: network + normalisation + sampling, save/load
train.py      train_generator: AdamW, EMA, clipping, validation, best kept, resumable, accelerate;
              FineTune: go on from a trained generator (adding edits to a pack)
"""

from .model import Generator, GeneratorConfig
from .train import FineTune, train_generator

__all__ = ["FineTune", "Generator", "GeneratorConfig", "train_generator"]
