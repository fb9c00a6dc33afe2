"""Records cut to what training can see, before anything tokenizes them whole.

TRL tokenizes each record whole and only then truncates it to ``max_length`` tokens: an 8 MB
record took 2.7 GB of memory to yield its first 1,024 tokens. A token covers at most as many
characters as its longest vocabulary entry (byte-level BPE: one symbol per byte; SentencePiece:
one per character), so a text field longer than (max_length + 16) x that many characters is cut
there, and kept cut only when the cut changes nothing the model sees: its tokens number at least
max_length and their first max_length equal those of a cut twice as long (tokens at a cut can
merge differently; a normaliser that drops characters, as whitespace or accents, can make a
token cover more). Where that check fails the field stays whole: memory, never tokens.

Each string field of a record is cut on its own (text; prompt and completion; each message's
content): a prompt that alone fills the window still does after its cut, so the completion stays
outside it as before.
"""

from __future__ import annotations

from typing import Any

MARGIN_TOKENS = 16


def longest_token_chars(tokenizer: Any) -> int:
    """The most characters one token of ``tokenizer`` can cover (its longest vocabulary entry,
    added tokens included; at least 1)."""
    vocab = tokenizer.get_vocab()
    return max((len(t) for t in vocab), default=1) or 1


def _cut(text: str, limit: int, tokenizer: Any, max_length: int) -> str:
    """``text`` cut to ``limit`` characters when that keeps its first ``max_length`` tokens."""
    if len(text) <= limit:
        return text
    first = tokenizer(text[:limit], add_special_tokens=False)["input_ids"]
    if len(first) < max_length:
        return text  # characters the tokenizer drops: the cut would shorten what it sees
    second = tokenizer(text[: 2 * limit], add_special_tokens=False)["input_ids"]
    if first[:max_length] != second[:max_length]:
        return text
    return text[:limit]


def bound_records(records: Any, tokenizer: Any, max_length: int) -> Any:
    """``records`` (TRL-shaped: text, prompt/completion strings, or message lists) with every
    long text field cut as the module docstring says; a dataset without long fields is
    returned as it is."""
    limit = (max_length + MARGIN_TOKENS) * longest_token_chars(tokenizer)

    def long(value: Any) -> bool:
        if isinstance(value, str):
            return len(value) > limit
        if isinstance(value, list):
            return any(isinstance(t, dict) and long(t.get("content")) for t in value)
        return False

    def cut(value: Any) -> Any:
        if isinstance(value, str):
            return _cut(value, limit, tokenizer, max_length)
        if isinstance(value, list):
            return [{**t, "content": cut(t["content"])} if isinstance(t, dict)
                    and isinstance(t.get("content"), str) else t for t in value]  # fmt: skip
        return value

    columns = [c for c in ("text", "prompt", "completion") if c in records.column_names]
    if not any(long(v) for c in columns for v in records[c]):
        return records
    return records.map(lambda r: {c: cut(r[c]) for c in columns})
