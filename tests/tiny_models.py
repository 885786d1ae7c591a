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


# --------------------------------------------------------------------------------------------------
# A GLM-4 whose weights are written by hand so that greedy decoding answers with fixed tool calls.
#
# Random weights never produce a tool call, and the server must not grow a test-only hook to fake one. So
# this model is built to behave like a tiny lookup machine, through the real transformers Glm4 code:
# - embeddings are one-hot (hidden size >= vocabulary), attention and MLP add nothing to the residual
#   except what is described next, and lm_head maps "current token i" to its successor: greedy decoding
#   follows a fixed chain of tokens;
# - at an <|assistant|> position, one attention head looks back for a trigger word of the user's message
#   ("paris", "both", "broken") and another for an earlier "get_time" output token; what they find
#   (through the pass-through, non-rotary half of each head, so position does not matter) picks the first
#   token of the answer.
# The tokenizer's decoder concatenates tokens, so output tokens can be exact strings like '{"city": '.
TOOL_MODEL_ANSWERS = {
    # trigger word in the user message -> the text of the answer's turns (split at <|assistant|>), its end
    None: (["\nHello there!"], "<|user|>"),  # no trigger: plain text
    "paris": (['get_weather\n{"city": "Paris"}'], "<|observation|>"),  # one call, in four tokens
    "both": (['get_time\n{"tz": "UTC"}', 'get_weather\n{"city": "Rome"}'], "<|observation|>"),  # two calls
    "broken": (['get_weather\n{"city": Paris'], "<|observation|>"),  # arguments that are not JSON
}
# tool_choice naming get_weather: the prompt ends with "<|assistant|>get_weather\n"; the model continues
# with the arguments '{"city": "Paris"}'.

_GLM4_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                  "<|assistant|>", "<|observation|>", "<unk>"]
_TRIGGERS = ["paris", "both", "broken"]
_WORDS = _TRIGGERS + ["get", "_", "weather", "time", "what", "is", "the", "in", "and", "?", ".", ",", "hello"]
# The chain: token -> next token under greedy decoding. <|assistant|> is decided by the attention heads.
_CHAIN = {
    "\nHello": " there", " there": "!", "!": "<|user|>",
    "get_weather": "\n", "\n": '{"city": ', '{"city": ': '"Paris"}', '"Paris"}': "<|observation|>",
    "weather": '{"city": ',  # after the prefilled "get_weather\n" (word-level: ... get _ weather)
    "get_time": "\n{", "\n{": '"tz": "UTC"}', '"tz": "UTC"}': "<|assistant|>",
    'get_weather\n{"city": "Rome"}': "<|observation|>",
    'get_weather\n{"city": Paris': "<|observation|>",
}
_FIRST = {None: "\nHello", "paris": "get_weather", "both": "get_time", "broken": 'get_weather\n{"city": Paris'}
_SECOND_CALL = 'get_weather\n{"city": "Rome"}'  # at <|assistant|> after a "get_time" call


def build_tool_calling_glm(path: Path, chat_template: str) -> dict:
    """Write the model above (with ``chat_template``: glm-4-9b-chat's official one) to ``path``; return its vocab."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import GenerationConfig, Glm4Config, Glm4ForCausalLM, PreTrainedTokenizerFast

    outputs = sorted({t for t in list(_CHAIN) + list(_CHAIN.values()) + list(_FIRST.values())
                      if t not in _GLM4_SPECIALS and t not in _WORDS})
    tokens = _GLM4_SPECIALS + _WORDS + outputs
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _GLM4_SPECIALS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>", clean_up_tokenization_spaces=False)
    tokenizer.chat_template = chat_template

    V = len(vocab)
    # residual dims: one per token, then what the heads found: a "nothing" dim per head and one per trigger
    null_a, found = V, {w: V + 1 + k for k, w in enumerate(_TRIGGERS)}
    null_b, seen_time = V + 1 + len(_TRIGGERS), V + 2 + len(_TRIGGERS)
    hidden = seen_time + 1
    hidden += -hidden % 4
    head_dim = 8
    eos_ids = [vocab[t] for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    config = Glm4Config(vocab_size=V, hidden_size=hidden, intermediate_size=8, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, head_dim=head_dim,
                        max_position_embeddings=2048, eos_token_id=eos_ids, pad_token_id=vocab["<|endoftext|>"],
                        tie_word_embeddings=False)
    model = Glm4ForCausalLM(config)
    assist = vocab["<|assistant|>"]
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight[:, :V] = torch.eye(V)
        layer = model.model.layers[0]
        layer.input_layernorm.weight.fill_(hidden ** -0.5)  # RMSNorm(one-hot) * this = the one-hot again
        attn = layer.self_attn
        c = (30.0 * head_dim ** 0.5) ** 0.5  # query . key * head_dim**-0.5 = 30 where they match
        for head in (0, 1):
            attn.q_proj.weight[head * head_dim + head_dim - 1, assist] = c  # the last dim: not rotated
        for word in _TRIGGERS:
            attn.k_proj.weight[head_dim - 1, vocab[word]] = c
        attn.k_proj.weight[2 * head_dim - 1, vocab["get_time"]] = c
        # values: head A says which trigger it found (else "nothing"), head B whether it saw get_time
        for i in range(V):
            word = tokens[i]
            attn.v_proj.weight[1 + _TRIGGERS.index(word) if word in _TRIGGERS else 0, i] = 1.0
            attn.v_proj.weight[head_dim + (1 if word == "get_time" else 0), i] = 1.0
        attn.o_proj.weight[null_a, 0] = 1.0
        for k, word in enumerate(_TRIGGERS):
            attn.o_proj.weight[found[word], 1 + k] = 1.0
        attn.o_proj.weight[null_b, head_dim] = 1.0
        attn.o_proj.weight[seen_time, head_dim + 1] = 1.0
        layer.post_self_attn_layernorm.weight.fill_((2.0 / hidden) ** 0.5)  # two unit components stay ~1
        for norm in (layer.post_attention_layernorm, layer.post_mlp_layernorm, model.model.norm):
            norm.weight.fill_(1.0)  # the MLP adds 0 (down_proj is zero), so post_mlp_layernorm(0) = 0
        head = model.lm_head.weight
        for i, token in enumerate(tokens):  # default: the chain, else end
            head[vocab[_FIRST[None] if i == assist else _CHAIN.get(token, "<|endoftext|>")], i] = 2.0
        for word in _TRIGGERS:  # at <|assistant|>: 1 + 2 = 3 beats the plain answer's 2 when the word is there
            head[vocab[_FIRST[word]], assist] = 1.0
            head[vocab[_FIRST[word]], found[word]] = 2.0
        second = vocab[_SECOND_CALL]  # after a get_time call: 1 + 1.5 + 2 = 4.5 beats get_time's 3
        head[second, assist] = 1.0
        head[second, found["both"]] = 1.5
        head[second, seen_time] = 2.0
    model.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=vocab["<|endoftext|>"])
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return vocab


def load_spread_glm(path: Path, device: str = "cpu"):
    """The tiny GLM at ``path`` loaded by the service's loader, its final norm scaled up so that logits are well
    apart: greedy paths differ by prompt, and float rounding (batch shapes, devices) cannot flip a near-tie."""
    from model_service.llm.loader import load_model

    loaded = load_model(str(path), device=device)
    with torch.no_grad():
        loaded.model.model.norm.weight.mul_(40)
    return loaded
