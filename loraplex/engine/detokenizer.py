"""Incremental detokenization and stop strings for one sequence."""

from __future__ import annotations

import codecs
import threading
import weakref
from typing import Any

from transformers import PreTrainedTokenizerBase

from loraplex.engine.request import SamplingParams

# Prompt tokens decoded as context ahead of the first output token: enough that tokenizers which treat
# the start of a decode specially (SentencePiece drops the leading space) see a mid-text continuation.
_PROMPT_CONTEXT_TOKENS = 5
_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    """Turns a stream of output token ids into text deltas, and ends the text at the first stop string.

    Decoding uses the prefix/read offset technique of TGI and vLLM: each step decodes only the window
    `ids[prefix_offset:]` and the already-emitted window `ids[prefix_offset:read_offset]`, and the delta
    is the difference. A window whose text ends in U+FFFD (a multi-byte character split across tokens)
    is held until a later token completes it, so no replacement character is ever emitted mid-stream.
    The window starts in the last few prompt tokens; for byte-level BPE tokenizers the text then equals
    `tokenizer.decode(output_ids, skip_special_tokens=...)`, while SentencePiece tokenizers keep the
    leading space of the first output token that a decode of the output alone would strip.
    Tokenization-space cleanup is never applied: it is not local to a window.

    Byte-level BPE tokenizers (GPT-2's byte alphabet, the `ByteLevel` decoder: SmolLM2, Llama 3, Qwen,
    GPT-NeoX ...) take a faster path with the same text: each token's bytes come from a table built once
    per tokenizer and checked against its own decoder (`byte_table`), and an incremental UTF-8 decoder
    holds a character's bytes until it is complete, so a token costs a lookup instead of two decodes.

    Stop strings: `text` is cut right before the earliest occurrence of any stop string, `stop_matched`
    names it, and later tokens are ignored. Like vLLM, the longest suffix of the text that could still
    begin a stop string is held back from the deltas until it is resolved, so a delta never carries any
    part of a stop string. `text` is exactly what the deltas have made visible; when the sequence ends
    for another reason (EOS, length, abort) call `flush()` to release the held-back tail.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = params.skip_special_tokens
        self._pieces = byte_table(tokenizer, params.skip_special_tokens)
        self._pending = b""  # the first bytes of a character whose other bytes are still to come
        self._stops = params.stop
        self._max_stop_len = max((len(s) for s in self._stops), default=0)
        # Only ids from prefix_offset on are kept: older ones are never decoded again.
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._decoded = ""  # all decoded output text, cut at the stop string once one matched
        self._emitted = 0  # how much of _decoded the returned deltas have covered
        self.stop_matched: str | None = None

    @property
    def text(self) -> str:
        """The output text the returned deltas add up to."""
        return self._decoded[: self._emitted]

    def add_tokens(self, token_ids: list[int]) -> str:
        """Append generated tokens; return the text they make visible (possibly "")."""
        if self.stop_matched is not None:
            return ""
        pieces = self._pieces
        for token_id in token_ids:
            old_len = len(self._decoded)
            if pieces is None:
                self._ids.append(token_id)
                self._decoded += self._decode_window()
            else:
                self._decoded += self._piece_text(pieces[token_id] if 0 <= token_id < len(pieces) else "")
            # Checked per token, so a batch of tokens stops where the same tokens one by one would.
            if self._stops and len(self._decoded) > old_len:
                self._find_stop(old_len)
                if self.stop_matched is not None:
                    break
        if self.stop_matched is not None or not self._stops:
            end = len(self._decoded)
        else:
            end = max(self._emitted, len(self._decoded) - self._stop_prefix_len())
        return self._emit(end)

    def add_token(self, token_id: int) -> None:
        """`add_tokens([token_id])` without building the delta (the engine reads `text`): for a token of
        whole characters and no stop strings, an append."""
        pieces = self._pieces
        if pieces is not None and not self._stops and self.stop_matched is None and 0 <= token_id < len(pieces):
            self._decoded += self._piece_text(pieces[token_id])
            self._emitted = len(self._decoded)
            return
        self.add_tokens([token_id])

    def _piece_text(self, piece: Piece) -> str:
        """The text a token's piece completes: the piece itself when it is whole characters and no character
        is pending, else what UTF-8 decoding of the pending bytes and the piece's gives, holding back the
        bytes of a character still incomplete (as an incremental decoder does; invalid bytes become U+FFFD)."""
        if isinstance(piece, str) and not self._pending:
            return piece
        data = self._pending + (piece if isinstance(piece, bytes) else piece.encode())
        text, used = codecs.utf_8_decode(data, "replace", False)
        self._pending = data[used:]
        return text

    def flush(self) -> str:
        """Release text held back as a possible stop-string start; for a sequence that ended otherwise.

        A trailing incomplete multi-byte character is not released: it would only be U+FFFD.
        """
        return self._emit(len(self._decoded))

    def _emit(self, end: int) -> str:
        delta = self._decoded[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return delta

    def _decode_window(self) -> str:
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(_INCOMPLETE):
            # Nothing new yet (a skipped special token) or a character still missing bytes: widen the window.
            return ""
        self._ids = self._ids[self._read_offset :]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        return full[len(prefix) :]

    def _decode(self, ids: list[int]) -> str:
        text = self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special_tokens, clean_up_tokenization_spaces=False
        )
        assert isinstance(text, str), "a flat id list decodes to one string"
        return text

    def _find_stop(self, old_len: int) -> None:
        # A match must end in the new text; none lies wholly in the old text, or it would have matched then.
        start = max(0, old_len - self._max_stop_len + 1)
        best: tuple[int, str] | None = None
        for stop in self._stops:
            at = self._decoded.find(stop, start)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        if best is not None:
            self._decoded = self._decoded[: best[0]]
            self.stop_matched = best[1]

    def _stop_prefix_len(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        text = self._decoded
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                # Cheap first-character check before the slice comparison.
                if text[-n] == stop[0] and text.endswith(stop[:n]):
                    longest = n
                    break
        return longest


Piece = str | bytes
"""A token's text: a str when its bytes are whole UTF-8 characters, else the bytes (part of a character)."""
_BYTE_TABLES: weakref.WeakKeyDictionary[Any, dict[bool, list[Piece] | None]] = weakref.WeakKeyDictionary()
_BYTE_TABLES_LOCK = threading.Lock()


def byte_table(tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool) -> list[Piece] | None:
    """Each token id's piece of decoded text ("" for a special token when skipped), for a byte-level BPE
    tokenizer whose decoder is exactly the concatenation of the pieces' bytes; None for any other tokenizer.

    Built once per tokenizer and flag (about half a second for 49,152 tokens) and checked: every token
    decoded alone by the tokenizer itself must equal its bytes decoded as UTF-8, or there is no table."""
    with _BYTE_TABLES_LOCK:
        tables = _BYTE_TABLES.setdefault(tokenizer, {})
        if skip_special_tokens not in tables:
            tables[skip_special_tokens] = _build_byte_table(tokenizer, skip_special_tokens)
        return tables[skip_special_tokens]


def _build_byte_table(tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool) -> list[Piece] | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.decoder).__name__ != "ByteLevel":
        return None
    size = backend.get_vocab_size(with_added_tokens=True)
    pieces: list[bytes | None] = [None] * size
    to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    for token, i in backend.get_vocab(with_added_tokens=True).items():
        if 0 <= i < size and all(c in to_byte for c in token):
            pieces[i] = bytes(to_byte[c] for c in token)
    for i, added in backend.get_added_tokens_decoder().items():
        if 0 <= i < size:
            pieces[i] = b"" if added.special and skip_special_tokens else added.content.encode()
    if any(p is None for p in pieces):
        return None
    raw: list[bytes] = pieces  # type: ignore[assignment]
    decoded = backend.decode_batch([[i] for i in range(size)], skip_special_tokens=skip_special_tokens)
    if any(text != piece.decode("utf-8", errors="replace") for text, piece in zip(decoded, raw, strict=True)):
        return None
    return [_whole(piece) for piece in raw]


def _whole(piece: bytes) -> Piece:
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return piece


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: the printable character standing for each byte in a byte-level token."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}
