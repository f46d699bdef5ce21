"""The inference runtime, at the bottom of the house: what runs a model with an edit on it.

- subject.py: a subject is the base model plus what a method switches on for a batch of queries
  (MeG's per-row neuron vectors, a weight edit, nothing); how to get the unedited model back.
- decoding.py: the greedy decoder of subjects (teacher forcing and draft-verified greedy decoding
  in length-sorted batches, resumable through checkpoint.py, shared among forked processes).
- generation.py: the bridge to HF `generate()` with per-row neuron vectors, streaming, seeding.
- conversation.py: chat prompts through the tokenizer's chat template.

It stands on lm.py (batched forward passes), neuron.py and data/prompts.py; EditedModel
(edited.py), the harness (eval/), the server (serve/) and the baselines stand on it.
"""
