"""esdtool finetune's options that tests/test_finetune.py does not reach: --eval-data (the eval
loss, recomputed here by a plain forward pass), --save-steps (checkpoints at multiples of N),
--resume-from-checkpoint last (the second run continues the first one's steps) and --seed
(another seed, other initial adapters). Training stays tiny: at most 6 steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from helpers import ARITHMETIC, finetune_json, run_cli, write_jsonl

pytest.importorskip("trl", reason="pip install 'esdtool[finetune]'")
pytest.importorskip("datasets", reason="pip install 'esdtool[finetune]'")


def _checkpoints(out: Path) -> dict[int, Path]:
    return {int(p.name.split("-")[1]): p for p in out.glob("checkpoint-*")}


def completion_loss(model, tokenizer, records: list[dict]) -> float:
    """Mean cross-entropy of the completion tokens (and the end-of-sequence token) given the
    prompt, over all such tokens of ``records``: the loss TRL's completion-only evaluation
    reports for one batch, computed here with a forward pass per record."""
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for r in records:
            prompt = tokenizer(r["prompt"])["input_ids"]
            ids = tokenizer(r["prompt"] + r["completion"])["input_ids"] + [tokenizer.eos_token_id]
            assert ids[: len(prompt)] == prompt
            logits = model(torch.tensor([ids])).logits[0].double()
            logp = torch.log_softmax(logits[:-1], -1)
            targets = torch.tensor(ids[1:])
            scored = torch.arange(1, len(ids)) >= len(prompt)
            total -= float(logp[torch.arange(len(ids) - 1), targets][scored].sum())
            count += int(scored.sum())
    return total / count


def test_eval_data_gives_the_eval_loss_of_the_trained_adapter(tiny_causal_lm, plan, tmp_path,
                                                              capsys):  # fmt: skip
    """--eval-data: the JSON summary's eval_loss equals the completion loss of the saved
    adapter on the eval records (one batch of 4), recomputed here by a forward pass, and the
    run record names the eval data. Without --eval-data both are null."""
    import peft
    import transformers

    train = write_jsonl(tmp_path / "train.jsonl", ARITHMETIC)
    held_out = [{"prompt": f"Q: what is {a} plus 7? A:", "completion": f" {a + 7}."}
                for a in range(4)]  # fmt: skip
    evaluation = write_jsonl(tmp_path / "eval.jsonl", held_out)
    out = tmp_path / "run"
    tested = [{"prompt": f"Q: what is {a} plus 9? A:", "completion": f" {a + 9}."}
              for a in range(5)]  # fmt: skip
    test = write_jsonl(tmp_path / "test.jsonl", tested)
    result = finetune_json(capsys, tiny_causal_lm, plan, train, out, "--max-steps", "3",
                       "--lr", "5e-3", "--eval-data", evaluation, "--test-data", test)  # fmt: skip
    assert result["steps"] == 3 and math.isfinite(result["eval_loss"]) and result["eval_loss"] > 0
    record = json.loads((out / "esdtool_run.json").read_text())
    assert record["eval_data"] == str(evaluation)
    assert record["result"]["eval_loss"] == result["eval_loss"]

    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
    model = peft.PeftModel.from_pretrained(base, out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    expected = completion_loss(model, tokenizer, held_out)
    assert result["eval_loss"] == pytest.approx(expected, rel=1e-4)
    # --test-data: the same loss on the held-out records, once, after training
    assert result["test_loss"] == pytest.approx(completion_loss(model, tokenizer, tested),
                                                rel=1e-4)  # fmt: skip
    assert record["test_data"] == str(test) and record["result"]["test_loss"] == result["test_loss"]

    plain = finetune_json(
        capsys, tiny_causal_lm, plan, train, tmp_path / "plain", "--max-steps", "1"
    )
    assert plain["eval_loss"] is None and plain["test_loss"] is None
    assert json.loads((tmp_path / "plain" / "esdtool_run.json").read_text())["eval_data"] is None


def test_save_steps_writes_checkpoints_at_multiples(tiny_causal_lm, plan, tmp_path, capsys):
    """--save-steps 2 with --max-steps 4: checkpoint-2 and checkpoint-4, each a resumable
    Trainer checkpoint (adapter weights, optimizer, trainer_state at that global step)."""
    data = write_jsonl(tmp_path / "train.jsonl", ARITHMETIC)
    out = tmp_path / "run"
    finetune_json(capsys, tiny_causal_lm, plan, data, out, "--max-steps", "4", "--save-steps", "2")
    found = _checkpoints(out)
    assert sorted(found) == [2, 4]
    for step, path in found.items():
        assert (path / "adapter_model.safetensors").is_file()
        assert (path / "optimizer.pt").is_file()
        assert json.loads((path / "trainer_state.json").read_text())["global_step"] == step


def test_resume_from_last_checkpoint_continues_the_steps(tiny_causal_lm, plan, tmp_path, capsys):
    """A first run of 4 steps saves checkpoint-2 and checkpoint-4; a second run with
    --resume-from-checkpoint last and --max-steps 6 starts from checkpoint-4 (the latest): it
    ends at global step 6 and its first four logged losses are the first run's, restored from
    the checkpoint. The second run trains on other records, so a run that started over
    would log another loss at step 1."""
    first_data = write_jsonl(tmp_path / "a.jsonl", ARITHMETIC)
    other = [{"prompt": f"Q: what is {a} times 3? A:", "completion": f" {3 * a}."}
             for a in range(16)]  # fmt: skip
    second_data = write_jsonl(tmp_path / "b.jsonl", other)
    out = tmp_path / "run"
    first = finetune_json(capsys, tiny_causal_lm, plan, first_data, out, "--max-steps", "4",
                      "--save-steps", "2", "--lr", "5e-3")  # fmt: skip
    assert sorted(_checkpoints(out)) == [2, 4]
    second = finetune_json(capsys, tiny_causal_lm, plan, second_data, out, "--max-steps", "6",
                       "--save-steps", "2", "--lr", "5e-3",
                       "--resume-from-checkpoint", "last")  # fmt: skip
    assert second["steps"] == 6
    assert [s for s, _ in second["losses"]] == [1, 2, 3, 4, 5, 6]
    assert second["losses"][:4] == first["losses"]
    assert 6 in _checkpoints(out)
    state = json.loads((_checkpoints(out)[6] / "trainer_state.json").read_text())
    assert state["global_step"] == 6


def test_other_seed_other_initial_adapter(tiny_causal_lm, plan, tmp_path):
    """--seed sets the adapters' random initialisation: seeds 7 and 8 give different lora_A
    matrices (test_finetune.py checks that one seed gives the same bytes twice)."""
    from safetensors.numpy import load_file

    from esdtool.training.recipe import FinetuneSettings, finetune

    data = write_jsonl(tmp_path / "d.jsonl", ARITHMETIC)
    weights = {}
    for seed in (7, 8):
        settings = FinetuneSettings(max_steps=1, batch_size=2, seed=seed, lr=1e-6)
        finetune(tiny_causal_lm, plan, data, tmp_path / str(seed), settings, progress=False)
        weights[seed] = load_file(str(tmp_path / str(seed) / "adapter_model.safetensors"))
    assert weights[7].keys() == weights[8].keys()
    lora_a = [k for k in weights[7] if "lora_A" in k]
    assert lora_a
    for key in lora_a:
        assert weights[7][key].shape == weights[8][key].shape
        assert abs(weights[7][key] - weights[8][key]).max() > 1e-3, key


def test_an_encoder_is_refused_in_one_line(minilm_dir, minilm_metrics, tmp_path, capsys):
    """finetune trains causal LMs: the demo encoder gets that one line, whichever task type
    its plan names, not a hint to re-plan that leads nowhere."""
    from esdtool import allocate

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    for task in ("FEATURE_EXTRACTION", "CAUSAL_LM"):
        plan = tmp_path / task
        allocate(minilm_metrics, plan, task_type=task)
        code, _, err = run_cli(["finetune", minilm_dir, "--adapter-config", plan, "--data", data,
                                "-o", tmp_path / "run"], capsys)  # fmt: skip
        assert code == 2 and "not a causal LM; finetune trains causal LMs" in err, err
        assert err.count("Error:") == 1 and "re-run esdtool allocate" not in err


def test_the_offline_tiny_model_says_it_is_random(tmp_path):
    import json

    from esdtool.training.tiny import make_tiny_causal_lm

    out = make_tiny_causal_lm(tmp_path / "tiny")
    assert "RANDOM WEIGHTS" in json.loads((out / "config.json").read_text())["esdtool_note"]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
