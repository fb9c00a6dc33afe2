"""Pretrain a small Llama-shaped causal LM on the Python standard library, on CPU, so that
esdtool's ablation has a pretrained model to run on where none can be downloaded.

The text is the pretraining part of ``stdlib_corpus`` (the running interpreter's stdlib .py
files, split by file; the files of the held-out task are never seen here), each file as
``# <relative path>`` then its source, joined with ``<|endoftext|>``. A byte-level BPE tokenizer
(``tokenizers``, vocabulary 4096) is trained on that text; the model is a 4-layer Llama (hidden
256, 8 query heads and 2 key/value heads, so k/v projections are 64 x 256 while q/o are
256 x 256; MLP 688; untied embeddings; about 4.9M parameters), trained from a seeded
initialisation with transformers' Trainer on blocks of 256 tokens, for a fixed number of steps
(CONFIG below; about 5 minutes on 2 idle CPU cores, 20 to 27 on shared ones).

Written to ``--cache-dir`` (default ``benchmarks/.cache/stdlib-llama``):

- ``pretrained/``: the trained model (config.json, model.safetensors) and its tokenizer;
- ``random-init/``: the same model at its initialisation (the step-0 weights of the run, same
  tokenizer), the baseline whose spectra have no learned structure;
- ``build.json``: the config, the hash it was built with, the corpus and token counts, the
  training time, the loss before and after on held-out blocks, the loss curve.

The hash covers CONFIG, the code of this file and of ``stdlib_corpus.py`` (their syntax trees
without docstrings), the Python version and the list of pretraining files; a cache with the
same hash is kept as it is (nothing retrained) unless ``--force``. Training on CPU with the
same seeds, threads and library versions is repeatable; see docs/ablation.md for the check.

    python benchmarks/pretrain_stdlib.py [--cache-dir DIR] [--force]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import stdlib_corpus  # noqa: E402

EOS, PAD = "<|endoftext|>", "<|pad|>"
CONFIG = {
    "split_seed": stdlib_corpus.SPLIT_SEED,
    "tokenizer": {"vocab_size": 4096, "min_frequency": 2},
    "model": {
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "rope_theta": 10000.0,
    },
    "train": {
        "seed": 0,
        "seq_len": 256,
        "batch_size": 16,
        "max_steps": 400,
        "lr": 2e-3,
        "warmup_steps": 40,
        "lr_scheduler": "cosine",
        "weight_decay": 0.1,
        "max_grad_norm": 1.0,
        "val_blocks": 64,
        "logging_steps": 10,
    },
}
DEFAULT_CACHE = HERE / ".cache" / "stdlib-llama"


def code_digest(path: Path) -> str:
    """What a source file does, not how it is laid out: its syntax tree without docstrings, so
    that a comment, a docstring or reformatting does not retrain the model."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def build_hash(files: list[str]) -> str:
    """The cache key: CONFIG, the code of this file and of stdlib_corpus.py, the Python version
    and the list of pretraining files."""
    h = hashlib.sha256()
    h.update(json.dumps(CONFIG, sort_keys=True).encode())
    for path in (Path(__file__), HERE / "stdlib_corpus.py"):
        h.update(code_digest(path).encode())
    h.update(platform.python_version().encode())
    h.update("\n".join(files).encode())
    return h.hexdigest()


def cached(cache: Path, digest: str) -> dict | None:
    try:
        build = json.loads((cache / "build.json").read_text())
    except (OSError, ValueError):
        return None
    models = (cache / "pretrained", cache / "random-init")
    complete = all((d / "model.safetensors").is_file() for d in models)
    return build if build.get("hash") == digest and complete else None


def train_tokenizer(texts: list[str]):
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=CONFIG["tokenizer"]["vocab_size"],
            min_frequency=CONFIG["tokenizer"]["min_frequency"],
            special_tokens=[EOS, PAD],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD, model_max_length=512
    )


def blocks(tokenizer, texts: list[str], seq_len: int) -> list[list[int]]:
    """Every file's tokens followed by EOS, concatenated and cut into blocks of ``seq_len``
    (the tail shorter than a block is dropped)."""
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    return [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]


def pretrain(cache: Path) -> dict:
    import datasets
    import torch
    import transformers

    t = CONFIG["train"]
    started = time.perf_counter()
    files = stdlib_corpus.split_files(CONFIG["split_seed"])["pretrain"]
    digest = build_hash(files)  # of the code and config that run now
    texts = list(stdlib_corpus.pretrain_documents(CONFIG["split_seed"]))
    n_bytes = sum(len(x.encode()) for x in texts)
    root = stdlib_corpus.stdlib_root()
    print(f"corpus: {len(texts)} stdlib files, {n_bytes / 1e6:.2f} MB ({root})")

    tokenizer = train_tokenizer(texts)
    all_blocks = blocks(tokenizer, texts, t["seq_len"])
    n_tokens = len(all_blocks) * t["seq_len"]
    print(
        f"tokenizer: vocabulary {len(tokenizer)}, {n_tokens:,} tokens in {len(all_blocks)} "
        f"blocks of {t['seq_len']} ({n_bytes / n_tokens:.2f} bytes per token)"
    )

    # a seeded draw of blocks held out for the loss before/after (never trained on)
    gen = torch.Generator().manual_seed(t["seed"])
    order = torch.randperm(len(all_blocks), generator=gen).tolist()
    val_ids = set(order[: t["val_blocks"]])
    train_blocks = [b for i, b in enumerate(all_blocks) if i not in val_ids]
    val_blocks = [all_blocks[i] for i in sorted(val_ids)]

    def dataset(rows):
        return datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})

    torch.manual_seed(t["seed"])
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **CONFIG["model"],
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    tmp = cache.with_name(cache.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "random-init")
    tokenizer.save_pretrained(tmp / "random-init")

    curve: list[dict] = []

    class Log(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                seconds = round(time.perf_counter() - t0, 1)
                row = {"step": state.global_step, "loss": round(logs["loss"], 4),
                       "lr": logs.get("learning_rate"), "seconds": seconds}  # fmt: skip
                curve.append(row)
                print(f"  step {row['step']:4d}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
                      f"{seconds:7.1f} s", flush=True)  # fmt: skip

    args = transformers.TrainingArguments(
        output_dir=str(tmp / "trainer"), per_device_train_batch_size=t["batch_size"],
        per_device_eval_batch_size=t["batch_size"], max_steps=t["max_steps"],
        learning_rate=t["lr"], warmup_steps=t["warmup_steps"], lr_scheduler_type=t["lr_scheduler"],
        weight_decay=t["weight_decay"], max_grad_norm=t["max_grad_norm"],
        logging_steps=t["logging_steps"], save_strategy="no", eval_strategy="no",
        report_to="none", seed=t["seed"], data_seed=t["seed"], use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=dataset(train_blocks),
        eval_dataset=dataset(val_blocks), data_collator=transformers.default_data_collator,
        callbacks=[Log()],
    )  # fmt: skip
    trainer.remove_callback(transformers.PrinterCallback)
    val_before = trainer.evaluate()["eval_loss"]
    print(f"model: Llama {n_params:,} parameters; held-out loss at init {val_before:.4f} "
          f"(ln {len(tokenizer)} = {math.log(len(tokenizer)):.4f})")  # fmt: skip
    print(f"training: {t['max_steps']} steps x {t['batch_size']} x {t['seq_len']} tokens, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    t0 = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - t0
    val_after = trainer.evaluate()["eval_loss"]
    model.config.use_cache = True  # the Trainer turned it off for training
    model.save_pretrained(tmp / "pretrained")
    tokenizer.save_pretrained(tmp / "pretrained")
    shutil.rmtree(tmp / "trainer", ignore_errors=True)

    build = {
        "hash": digest,
        "config": CONFIG,
        "python": platform.python_version(),
        "stdlib": str(stdlib_corpus.stdlib_root()),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "corpus": {
            "files": len(texts),
            "bytes": n_bytes,
            "tokens": n_tokens,
            "train_blocks": len(train_blocks),
            "val_blocks": len(val_blocks),
        },
        "parameters": n_params,
        "threads": torch.get_num_threads(),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "tokens_seen": t["max_steps"] * t["batch_size"] * t["seq_len"],
        "train_loss_mean": round(result.training_loss, 4),
        "train_loss_last": curve[-1]["loss"] if curve else None,
        "val_loss_init": round(val_before, 4),
        "val_loss_final": round(val_after, 4),
        "loss_curve": curve,
    }
    (tmp / "build.json").write_text(json.dumps(build, indent=2) + "\n")
    shutil.rmtree(cache, ignore_errors=True)
    tmp.rename(cache)
    return build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--force", action="store_true", help="retrain even when the cache matches")
    ns = parser.parse_args()
    cache = ns.cache_dir.resolve()
    digest = build_hash(stdlib_corpus.split_files(CONFIG["split_seed"])["pretrain"])
    build = None if ns.force else cached(cache, digest)
    if build is not None:
        print(f"cached: {cache} holds a model built with this config (hash {digest[:12]}); "
              "not retrained")  # fmt: skip
    else:
        build = pretrain(cache)
        print(f"trained in {build['train_seconds']:.0f} s ({build['total_seconds']:.0f} s in all)")
    print(f"pretrained: {cache / 'pretrained'} (held-out loss {build['val_loss_init']:.3f} at "
          f"init -> {build['val_loss_final']:.3f}; last logged train loss "
          f"{build['train_loss_last']})")  # fmt: skip
    print(f"random-init: {cache / 'random-init'}")


if __name__ == "__main__":
    main()
