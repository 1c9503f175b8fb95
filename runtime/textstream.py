"""Token ids -> text as it becomes final: incremental detokenization with stop strings.

Each token decodes a short window, as HF's TextStreamer and vLLM do: the text of ids[p:] minus the text of ids[p:r]
(p, r: the previous and the latest settled offsets) is what the new token adds, unless it ends in U+FFFD (the bytes
of one UTF-8 character split over tokens: wait for the rest). Cost per token: a few tokens, not the whole output.
Of the text so far, only what can no longer change is released:
  - nothing past a trailing U+FFFD (an incomplete UTF-8 sequence),
  - nothing that could be the start of a stop string (held until it is ruled in or out).
When a stop string appears, the text ends just before it and the stream is finished.
"""
from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self._p = self._r = 0      # decode window: ids[_p:_r] settled text, ids[_r:] not yet turned into text
        self.sent = 0              # characters of the text released so far
        self.text = ""             # the text so far (up to a stop string, if one was found)
        self.stopped = False       # a stop string was found

    def push(self, token: int) -> str:
        """Add a token; returns the newly final text (possibly empty)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        dec = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)   # noqa: E731
        before, now = dec(self.ids[self._p:self._r]), dec(self.ids[self._p:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            text = self.text + now[len(before):]
            self._p, self._r = self._r, len(self.ids)
        else:
            text = self.text               # nothing settled yet: the token waits for the next one
        hits = [at for s in self.stop if (at := text.find(s, max(0, self.sent - len(s) + 1))) != -1]
        if hits:
            self.stopped, self.text = True, text[:min(hits)]
            return self._release(len(self.text))
        self.text = text
        end = len(text)
        held = 0                            # the longest tail that could begin a stop string
        for s in self.stop:
            held = max([held] + [k for k in range(1, min(len(s) - 1, end) + 1) if text[end - k:end] == s[:k]])
        return self._release(max(end - held, self.sent))

    def flush(self) -> str:
        """At the end: everything not yet released (a held-back partial stop string is text after all, and so are
        tokens that never settled)."""
        if not self.stopped and self._r < len(self.ids):
            tail = self.tokenizer.decode(self.ids[self._p:], skip_special_tokens=True)
            self.text += tail[len(self.tokenizer.decode(self.ids[self._p:self._r], skip_special_tokens=True)):]
            self._p = self._r = len(self.ids)
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out
