"""Tiny models built from a transformers config (no weights downloaded), shared by tests and benchmarks.

Imports nothing of the test harness, so it also runs where only torch and transformers exist (a GPU box).
"""

from __future__ import annotations

from pathlib import Path

import torch

GLM_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# GLM-4 ends a turn with any of three tokens; a server that only reads tokenizer.eos_token misses two.
GLM_EOS = ["<|endoftext|>", "<|user|>", "<|observation|>"]


def build_tiny_glm(path: Path, *, always_emit: str | None = None) -> dict:
    """A random GLM-4 (Glm4ForCausalLM) with a word-level tokenizer and GLM-4's chat format.

    ``always_emit``: make greedy decoding pick that token at every step (final norm zeroed, so all
    logits tie at 0 and argmax takes the lowest id; the vocabulary puts that token first).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, Glm4Config, Glm4ForCausalLM, PreTrainedTokenizerFast

    specials = ["<|observation|>", "<|endoftext|>", "<|user|>", "[gMASK]", "<sop>", "<|system|>",
                "<|assistant|>", "<unk>"]
    if always_emit:
        specials.remove(always_emit)
        specials.insert(0, always_emit)
    words = ["the", "capital", "of", "france", "is", "paris", "what", "?", ".", "hello", "world"]
    words += [f"w{i}" for i in range(100)]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.Punctuation()])
    from tokenizers import AddedToken

    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = GLM_TEMPLATE
    eos_ids = [vocab[t] for t in GLM_EOS]
    config = Glm4Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                        eos_token_id=eos_ids, pad_token_id=vocab["<|endoftext|>"])
    torch.manual_seed(0)
    model = Glm4ForCausalLM(config)
    if always_emit:
        with torch.no_grad():
            model.model.norm.weight.zero_()
    model.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=vocab["<|endoftext|>"])
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return vocab
