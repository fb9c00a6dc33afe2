"""What a trained adapter scores beyond its loss: exact match of greedy answers, and forgetting
(the change of loss on general text against the base model, as PEFT's method comparison
measures it).

Answers are compared as GSM8K and Math10K grade them: the text after the last ``####``, else
the last number in the text, else the whole stripped text; numbers compare by value
(``1,000`` = ``1000.0``). A user's ``answer_regex`` (run by RE2, linear in the text) replaces
that rule: its first group, or its whole match, of the first match.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from esdtool.untrusted import user_regex

# A number: digits with optional thousands commas, decimals and sign (RE2, like every pattern
# esdtool runs on text it did not write: here a model's output).
_NUMBER = r"-?\d+(?:,\d{3})*(?:\.\d+)?"


def extract_answer(text: str, answer_regex: str | None = None) -> str:
    """The answer in ``text`` (see the module docstring)."""
    if answer_regex is not None:
        found = user_regex(answer_regex, "--answer-regex").search(text)
        if found is None:
            return ""
        groups = found.groups()
        return ((groups[0] if groups else found.group(0)) or "").strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip()
    numbers = user_regex(_NUMBER, "the number pattern").findall(text)
    if numbers:
        return numbers[-1]
    return text.strip()


def same_answer(predicted: str, expected: str) -> bool:
    """Equal as numbers when both read as numbers, else as stripped text."""
    a, b = _number(predicted), _number(expected)
    if a is not None and b is not None:
        return a == b
    return predicted.strip().rstrip(".").strip() == expected.strip().rstrip(".").strip()


def _number(text: str) -> float | None:
    cleaned = text.strip().strip(" .!?$%").replace(",", "")
    try:
        value = float(Decimal(cleaned))
    except (InvalidOperation, ValueError):
        return None
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class ExactMatch:
    """Share of records whose greedy answer equals the completion's answer."""

    score: float
    correct: int
    total: int


def prompts_and_answers(records: Any, tokenizer: Any) -> list[tuple[str, str]]:
    """(prompt text, expected completion) of TRL-shaped records: prompt/completion strings, or
    chat turns (the prompt rendered with the chat template, the last turn the completion)."""
    pairs = []
    for record in records:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list):  # messages: the turns before the last, then the last
            text = tokenizer.apply_chat_template(prompt, tokenize=False,
                                                 add_generation_prompt=True)  # fmt: skip
            pairs.append((text, completion[-1]["content"]))
        else:
            pairs.append((prompt, completion))
    return pairs


def exact_match(
    model: Any,
    tokenizer: Any,
    pairs: list[tuple[str, str]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    answer_regex: str | None = None,
) -> ExactMatch:
    """Greedy answers of ``model`` to each prompt of ``pairs`` against the expected ones."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues the prompt's last token
    correct = 0
    try:
        model.eval()
        device = next(model.parameters()).device
        for start in range(0, len(pairs), batch_size):
            batch = pairs[start : start + batch_size]
            encoded = tokenizer([p for p, _ in batch], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(device)  # fmt: skip
            with torch.no_grad():
                out = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)  # fmt: skip
            new = out[:, encoded["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            for text, (_, expected) in zip(texts, batch, strict=True):
                mine = extract_answer(text, answer_regex)
                correct += same_answer(mine, extract_answer(expected, answer_regex))
    finally:
        tokenizer.padding_side = side
    total = len(pairs)
    return ExactMatch(correct / total if total else math.nan, correct, total)


def mean_nll(model: Any, tokenizer: Any, texts: list[str], max_length: int = 1024) -> float:
    """Mean negative log-likelihood per predicted token of ``texts`` (each truncated to
    ``max_length`` tokens), over all their tokens."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=max_length,
                            return_tensors="pt")["input_ids"].to(device)  # fmt: skip
            if ids.shape[1] < 2:
                continue
            logits = model(input_ids=ids).logits[0, :-1].double()
            logp = torch.log_softmax(logits, -1)
            targets = ids[0, 1:]
            total -= float(logp[torch.arange(len(targets)), targets].sum())
            count += len(targets)
    return total / count if count else math.nan


def forgetting(model: Any, tokenizer: Any, texts: list[str], max_length: int = 1024) -> float:
    """How much worse a PEFT model predicts general text than its base model: mean NLL with
    the adapter minus mean NLL with it disabled (positive: forgotten)."""
    tuned = mean_nll(model, tokenizer, texts, max_length)
    with model.disable_adapter():
        base = mean_nll(model, tokenizer, texts, max_length)
    return tuned - base
