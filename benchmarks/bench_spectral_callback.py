"""What SpectralCallback costs a training run: the time of one measurement of the adapter's
spectra (``esdtool.analyze(model, weights="adapter")``, the r x r route) against the time of one
training step, on the tiny causal LM (2-layer Llama, hidden 64) and on a Llama-shaped 1-layer
model (hidden 1024, grouped k/v, intermediate 2816), LoRA on every linear layer, in one run.

Both are measured inside the same transformers Trainer loop: the mean step time of a run
without the callback, then the callback's own measurement time from the same model. The
overhead at ``--every N`` is measurement / (N x step). Target: under 2% at every 50 steps.

    python benchmarks/bench_spectral_callback.py [--steps 20] [--rank 16] [--every 50]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

TARGET = 0.02


def _model(kind: str, rank: int):
    import peft
    import transformers

    if kind == "tiny":
        config = transformers.LlamaConfig(
            vocab_size=300, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        )  # fmt: skip
        length, batch = 32, 4
    else:
        config = transformers.LlamaConfig(
            vocab_size=8000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=1,
            num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=1024,
        )  # fmt: skip
        length, batch = 256, 4
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    model = peft.get_peft_model(base, peft.LoraConfig(r=rank, target_modules="all-linear"))
    ids = torch.randint(0, config.vocab_size, (64, length))
    data = [{"input_ids": row, "labels": row} for row in ids]
    return model, data, batch


class _Timer:
    """Step wall times from the Trainer's own step boundaries."""

    def __init__(self) -> None:
        import transformers

        timer = self

        class Callback(transformers.TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.steps.append(time.perf_counter() - timer.start)

        self.steps: list[float] = []
        self.callback = Callback()


def measure(kind: str, steps: int, rank: int) -> tuple[float, float, int]:
    """(median step seconds, median measurement seconds, adapted modules)."""
    import transformers

    from esdtool import analyze

    model, data, batch = _model(kind, rank)
    timer = _Timer()
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=batch,
            learning_rate=1e-3, report_to="none", save_strategy="no", disable_tqdm=True,
            logging_strategy="no",
        )  # fmt: skip
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                       callbacks=[timer.callback])  # fmt: skip
        trainer.train()
    analyze(model, weights="adapter")  # the first call imports and warms up
    times = []
    for _ in range(5):
        start = time.perf_counter()
        table = analyze(model, weights="adapter").table
        times.append(time.perf_counter() - start)
    modules = int(table.lora_rank.notna().sum())
    return statistics.median(timer.steps[2:]), statistics.median(times), modules


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--every", type=int, default=50)
    options = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, LoRA r={options.rank} "
          f"on every linear layer; overhead = measurement / ({options.every} x step)")  # fmt: skip
    print(f"{'model':<22} {'modules':>7} {'step':>10} {'measurement':>12} {'overhead':>9}")
    ok = True
    for kind, label in (("tiny", "tiny causal LM"), ("llama1", "Llama-shaped 1 layer")):
        step, probe, modules = measure(kind, options.steps, options.rank)
        overhead = probe / (options.every * step)
        ok &= overhead < TARGET
        print(f"{label:<22} {modules:>7} {step * 1e3:>8.1f}ms {probe * 1e3:>10.1f}ms "
              f"{overhead:>8.2%}")  # fmt: skip
    print(f"target: under {TARGET:.0%} at every {options.every} steps: "
          f"{'met' if ok else 'NOT met'}")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
