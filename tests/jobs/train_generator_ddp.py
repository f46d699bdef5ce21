"""Run under `accelerate launch --num_processes 2`: the same generator training as one process,
data parallel. Writes the trained generator (main process) and a checksum of each process's final
weights, so the test can check that the processes stayed in step."""

import hashlib
import sys

import torch
from accelerate import PartialState

from megedit.stages.generator import GeneratorConfig, train_generator

out = sys.argv[1]
g = torch.Generator().manual_seed(0)
cond = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
vectors = 0.3 * torch.randn(8, 20, generator=g) + 0.1
config = GeneratorConfig(kind="mlp", mlp=dict(hidden=64, depth=2, dropout=0.0), lr=2e-3, batch_size=8,
                         train_steps=200, passes=None, validate_every=100, ema_decay=0.9, validation_size=8)
generator = train_generator(cond, vectors, config, progress=False)
state = PartialState()
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in generator.net.parameters())).hexdigest()
with open(f"{out}/weights-{state.process_index}.sha256", "w") as f:
    f.write(digest)
if state.is_main_process:
    generator.save(f"{out}/generator.safetensors")
