"""Records are cut to what training can see before TRL tokenizes them whole (issue 29 item 5):
the cut keeps the first max_length tokens exactly, and a tokenizer that drops characters keeps
the record whole."""

from __future__ import annotations

import datasets
import pytest

from esdtool.training.bounded import MARGIN_TOKENS, bound_records, longest_token_chars


@pytest.fixture(scope="module")
def tokenizer(tiny_causal_lm):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(tiny_causal_lm)


def test_a_long_record_keeps_its_first_max_length_tokens(tokenizer):
    """A 400 kB text, prompt and completion: each field cut to (64 + 16) x the longest token,
    and the tokens of the cut record's window equal the whole record's."""
    words = " ".join(f"def f{i}(x): return x * {i}" for i in range(20_000))
    records = datasets.Dataset.from_list([{"prompt": words, "completion": words}])
    bounded = bound_records(records, tokenizer, 64)
    limit = (64 + MARGIN_TOKENS) * longest_token_chars(tokenizer)
    assert len(words) > 10 * limit
    assert len(bounded[0]["prompt"]) == limit == len(bounded[0]["completion"])
    whole = tokenizer(words, add_special_tokens=False)["input_ids"][:64]
    cut = tokenizer(bounded[0]["prompt"], add_special_tokens=False)["input_ids"][:64]
    assert cut == whole
    text = datasets.Dataset.from_list([{"text": words}, {"text": "short"}])
    out = bound_records(text, tokenizer, 64)
    assert len(out[0]["text"]) == limit and out[1]["text"] == "short"
    turns = {"prompt": [{"role": "user", "content": words}],
             "completion": [{"role": "assistant", "content": "ok"}]}  # fmt: skip
    chat = datasets.Dataset.from_list([turns])
    assert len(bound_records(chat, tokenizer, 64)[0]["prompt"][0]["content"]) == limit


def test_a_tokenizer_that_drops_characters_keeps_the_record_whole():
    """A tokenizer that drops spaces (as normalisers drop whitespace or accents): a cut inside
    a long run of spaces would see fewer than max_length tokens, so nothing is cut."""

    class Dropping:
        def get_vocab(self):
            return {"a": 0, "b": 1}

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [0 if c == "a" else 1 for c in text if c != " "]}

    text = "a" * 10 + " " * 10_000 + "b" * 500
    records = datasets.Dataset.from_list([{"text": text}])
    assert bound_records(records, Dropping(), 64)[0]["text"] == text
    assert bound_records(records, Dropping(), 4)[0]["text"] == text[: (4 + MARGIN_TOKENS)]
