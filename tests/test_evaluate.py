"""Scores beyond the loss (esdtool.training.evaluate), for ablate --metric exact-match and
--forgetting-data: answer extraction on hand-written GSM8K and Math10K style answers, exact
match against an independent token-by-token greedy decoder, forgetting against an independent
float64 forward pass of the base model."""

from __future__ import annotations

import pytest

from esdtool.training.evaluate import extract_answer, same_answer

pytest.importorskip("peft", reason="pip install 'esdtool[finetune]'")

GSM8K = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)


@pytest.mark.parametrize(
    ("text", "regex", "answer"),
    [
        (GSM8K, None, "72"),
        ("so the total is 1,000 dollars.\n#### 1,000", None, "1,000"),
        ("#### 5\nthen some trailing talk with 9", None, "5"),
        ("The answer is 18.", None, "18"),  # Math10K: no ####, the last number
        ("It costs -3.50 in the end", None, "-3.50"),
        ("x = 12 and y = 15", None, "15"),
        ("  Paris  ", None, "Paris"),  # no number: the stripped text
        ("Answer: (B) because", r"\(([A-E])\)", "B"),
        ("value 42 here", r"\d+", "42"),  # no group: the whole match
        ("nothing", r"Answer: (\d+)", ""),
    ],
)
def test_the_answer_is_found_where_gsm8k_puts_it(text, regex, answer):
    assert extract_answer(text, regex) == answer


def test_answers_compare_as_numbers_when_they_are_numbers():
    assert same_answer("1,000", "1000") and same_answer("3.50", "3.5") and same_answer("7.", "7")
    assert not same_answer("3", "4") and not same_answer("1000", "100")
    assert same_answer("Paris", " Paris ") and not same_answer("Paris", "paris")


def test_a_bad_answer_regex_is_one_line():
    with pytest.raises(ValueError, match="--answer-regex"):
        extract_answer("x", r"(a)\1")


def _model(tiny_causal_lm, random_b: bool):
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=not random_b)  # fmt: skip
    return peft.get_peft_model(base, config)


def _greedy(model, tokenizer, prompt: str, steps: int) -> str:
    """Greedy decoding one token at a time, no batching, no padding, no cache."""
    import torch

    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids + new])).logits[0, -1]
            token = int(torch.argmax(logits))
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_exact_match_equals_an_independent_greedy_decoder(tiny_causal_lm):
    """Prompts of different lengths in batches of 3 (left padding): the records whose expected
    completion is the independent decoder's own answer count as correct, the others (an answer
    the decoder did not give) as wrong: the score is exactly the share planted."""
    import transformers

    from esdtool.training.evaluate import exact_match

    model = _model(tiny_causal_lm, random_b=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_causal_lm)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    prompts = [f"Q: what is {a} plus {b}? A:" for a, b in ((1, 2), (10, 20), (123, 4), (7, 7),
                                                            (0, 99999), (5, 6))]  # fmt: skip
    pairs = []
    for i, prompt in enumerate(prompts):
        theirs = _greedy(model, tokenizer, prompt, 8)
        answer = extract_answer(theirs)
        pairs.append((prompt, theirs if i % 2 == 0 else f"#### {answer}zz"))
    scored = exact_match(model, tokenizer, pairs, max_new_tokens=8, batch_size=3)
    assert (scored.correct, scored.total) == (3, 6) and scored.score == 0.5


def test_forgetting_is_the_loss_change_against_the_base_model(tiny_causal_lm):
    """An untrained adapter (B = 0) forgets nothing, exactly; a perturbed one forgets its mean
    NLL minus the base model's, the base's recomputed in float64 from a model loaded alone."""
    import torch
    import transformers

    from esdtool.training.evaluate import forgetting, mean_nll

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_causal_lm)
    texts = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over it.", "1 2 3"]
    untrained = _model(tiny_causal_lm, random_b=False)
    assert forgetting(untrained, tokenizer, texts) == 0.0

    tuned = _model(tiny_causal_lm, random_b=True)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_causal_lm).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text)["input_ids"]
            logp = torch.log_softmax(base(torch.tensor([ids])).logits[0, :-1].double(), -1)
            total -= float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())
            count += len(ids) - 1
    expected = mean_nll(tuned, tokenizer, texts) - total / count
    assert forgetting(tuned, tokenizer, texts) == pytest.approx(expected, rel=1e-9)
    assert abs(expected) > 1e-3  # the perturbed adapter does change the predictions
