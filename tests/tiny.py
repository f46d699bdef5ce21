"""Tiny random causal LMs of every architecture in the table, built in-process (no files)."""

import torch
import transformers
from transformers import AutoModelForCausalLM

VOCAB = 98  # the character tokenizer below: <pad>, <eos>, newline and the 95 printable ASCII characters
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
               num_attention_heads=4, max_position_embeddings=128, bos_token_id=1, eos_token_id=1,
               pad_token_id=0)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(num_key_value_heads=2, **_COMMON),
    "mistral": lambda: transformers.MistralConfig(num_key_value_heads=2, **_COMMON),
    "qwen2": lambda: transformers.Qwen2Config(num_key_value_heads=2, **_COMMON),
    "qwen3": lambda: transformers.Qwen3Config(num_key_value_heads=2, head_dim=8, **_COMMON),
    "olmo": lambda: transformers.OlmoConfig(num_key_value_heads=2, **_COMMON),
    "gemma": lambda: transformers.GemmaConfig(num_key_value_heads=2, head_dim=8, **_COMMON),
    "gemma2": lambda: transformers.Gemma2Config(num_key_value_heads=2, head_dim=8, **_COMMON),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(num_key_value_heads=2, head_dim=8, **_COMMON),
    "phi3": lambda: transformers.Phi3Config(num_key_value_heads=2, **_COMMON),
    "phi": lambda: transformers.PhiConfig(**_COMMON),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**_COMMON),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=128,
                                            bos_token_id=1, eos_token_id=1, pad_token_id=0),
    "gptj": lambda: transformers.GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=128,
                                            rotary_dim=4, bos_token_id=1, eos_token_id=1, pad_token_id=0),
}


def tiny_model(model_type: str, seed: int = 0, init_range: float | None = None):
    """A random model; a larger `init_range` gives peaked logits, so a few optimisation steps
    can change its answers (the default 0.02 keeps every logit near zero)."""
    torch.manual_seed(seed)
    config = CONFIGS[model_type]()
    if init_range is not None:
        config.initializer_range = init_range
    model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def char_tokenizer():
    """A real fast tokenizer with one token per character (no merges), so every token sequence
    decodes to text that encodes back to the same tokens: id 0 <pad>, id 1 <eos>."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "\n": 2}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_encoder(seed: int = 0, layers: int = 2):
    """A random BERT sentence encoder (mean pooling) over the character tokenizer, right-padded."""
    from megedit.models import SentenceEncoder

    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=128, pad_token_id=0)
    tokenizer = char_tokenizer()
    tokenizer.padding_side = "right"
    return SentenceEncoder(transformers.BertModel(config).eval(), tokenizer).requires_grad_(False)
