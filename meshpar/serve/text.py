"""Text to token ids and back: the model's tokenizer, or bytes for meshpar's byte-level
model; and a decoder for a stream of tokens that never splits a character."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Codec:
    """A tokenizer (meshpar/data/tokenizer.py), or None: the text's UTF-8 bytes."""

    tokenizer: object | None = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size if self.tokenizer else 256

    @property
    def stop(self) -> frozenset[int]:
        """The ids that end a continuation: the tokenizer's end-of-text (none for bytes)."""
        return frozenset({self.tokenizer.end_of_text_id}) if self.tokenizer else frozenset()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode([text])[0] if self.tokenizer else list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer:
            return self.tokenizer.decode(ids)
        return bytes(t for t in ids if t < 256).decode("utf-8", errors="replace")


class StreamDecoder:
    """The text of a growing list of tokens, given out piece by piece: a character whose
    bytes have not all come yet is held back until they have (or the stream ends)."""

    def __init__(self, codec: Codec):
        self.codec, self.tokens, self.sent = codec, [], 0

    def push(self, token: int) -> str:
        """The new text that `token` completes ('' while a character is incomplete)."""
        self.tokens.append(token)
        text = self.codec.decode(self.tokens)
        end = len(text)
        while end > self.sent and text[end - 1] == "\ufffd":  # possibly the start of a character
            end -= 1
        piece, self.sent = text[self.sent:end], max(self.sent, end)
        return piece

    def flush(self) -> str:
        """What is left at the end of the stream (an incomplete character as U+FFFD)."""
        text = self.codec.decode(self.tokens)
        piece, self.sent = text[self.sent:], len(text)
        return piece
