"""Token ids → text deltas, honouring stop strings (what vLLM's detokenizer does for its engine).

Two things make this more than `tokenizer.decode` per token:
  * one character can span several byte-level tokens, so text is released only once it decodes
    without the replacement character, and a token's text can depend on its neighbours (spaces),
    so each step decodes a short window and emits the difference (the approach of HF's TGI);
  * a stop string can arrive split over tokens, so the last `len(longest stop) - 1` characters are
    held back until it is clear they do not start one. The returned text ends before the stop.
"""

from __future__ import annotations

_INCOMPLETE = "\ufffd"  # what a partial UTF-8 sequence decodes to


class TextStream:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self._tokenizer = tokenizer
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: context so the next token's text decodes right
        self._read_offset = 0  # tokens already turned into text
        self._text = ""  # all text decoded so far
        self._sent = 0  # characters of _text already handed out

    def add(self, token_id: int) -> tuple[str, bool]:
        """Feed one generated token; returns (text safe to send now, whether a stop string was hit)."""
        self._ids.append(token_id)
        before = len(self._text)
        self._text += self._decode_new_text()
        if self._stop:
            search_from = max(0, before - self._hold)
            hits = [i for i in (self._text.find(s, search_from) for s in self._stop) if i != -1]
            if hits:
                cut = min(hits)
                out = self._text[self._sent:cut]
                self._text = self._text[:cut]
                self._sent = cut
                return out, True
        ready = len(self._text) - self._hold
        if ready <= self._sent:
            return "", False
        out = self._text[self._sent:ready]
        self._sent = ready
        return out, False

    def flush(self) -> str:
        """The text still held back, once the sequence has ended without a stop string."""
        out = self._text[self._sent:]
        self._sent = len(self._text)
        return out

    def _decode_new_text(self) -> str:
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset:self._read_offset], skip_special_tokens=True)
        window_text = decode(self._ids[self._prefix_offset:], skip_special_tokens=True)
        if len(window_text) > len(prefix_text) and not window_text.endswith(_INCOMPLETE):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return window_text[len(prefix_text):]
        return ""
