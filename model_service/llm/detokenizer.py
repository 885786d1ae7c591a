"""Incremental detokenization with stop strings.

Text is produced token by token without re-decoding the whole output each step (the offset
technique TGI and vLLM use), never emits half of a multi-byte character, and holds back a tail
that might turn out to be the start of a stop string, so a stop string never reaches the client.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    # Decode a few tokens of left context so tokenizers that merge spaces across tokens
    # (SentencePiece's leading "▁", byte-level BPE) render the boundary correctly.
    CONTEXT_TOKENS = 5

    def __init__(self, tokenizer, prompt_ids: list[int], stop: tuple[str, ...] = ()):
        self._tokenizer = tokenizer
        self._ids: list[int] = _context_after_special(tokenizer, list(prompt_ids[-self.CONTEXT_TOKENS:]))
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = tuple(s for s in stop if s)
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self._pending = ""  # decoded text not yet released (may begin a stop string)
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add_token(self, token_id: int) -> str:
        """Feed one generated token; return the text that may be released now."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence, or a token with no text of its own
        new_text = full[len(prefix):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return self._release(new_text)

    def _release(self, new_text: str) -> str:
        if not self._stop:
            return new_text
        text = self._pending + new_text
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            self._pending = ""
            return text[: min(hits)]
        # keep back the longest tail that is a proper prefix of some stop string
        hold = 0
        for n in range(min(len(text), self._max_stop - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                hold = n
                break
        self._pending = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        """At the end of generation: release whatever was held back."""
        text, self._pending = self._pending, ""
        return text


def _context_after_special(tokenizer, tail: list[int]) -> list[int]:
    """The left context, cut after the last special token of the prompt.

    Text restarts after a special token: SentencePiece's decode drops the dummy-prefix space of the first piece
    after one (ChatGLM3's ``<|assistant|>`` then "▁only" is "only", as its official chat() returns it), so
    context from before the special token would add a space the model did not produce.
    """
    special = {i for i, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
               if getattr(token, "special", False)}
    for i in range(len(tail) - 1, -1, -1):
        if tail[i] in special:
            return tail[i + 1:]
    return tail
