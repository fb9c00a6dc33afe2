"""The whole stdlib ablation study, end to end, as docs/ablation.md reports it:

1. pretrain the small Llama on the standard library (``pretrain_stdlib.py``; kept when its cache
   matches);
2. ``esdtool analyze`` the pretrained model and its random initialisation, and compare their
   spectra per module kind (``alpha_table.csv`` / ``.md``);
3. write the held-out task (``stdlib_task.py``: signature -> first docstring line);
4. ``esdtool ablate`` with the default arms (uniform, esd, shuffled, placement), 3 seeds x 3
   learning rates, on that task.

Everything goes under OUTDIR (default /tmp/stdlib-study); each command is printed before it runs.
Re-running resumes: the model is cached and ``esdtool ablate`` keeps the runs it finished.

    python benchmarks/ablation_study.py [OUTDIR] [--esdtool PATH]
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ABLATE = [
    "--seeds", "3", "--lrs", "1.5e-3,3e-3,6e-3", "--max-steps", "60", "--batch-size", "16",
    "--max-length", "128",
]  # fmt: skip


def sh(cmd: list[str]) -> None:
    print("$ " + shlex.join(cmd), flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)


def alpha_table(pretrained: Path, random: Path):
    """Median over the layers of alpha_median, alpha_ks and num_spikes per module kind."""
    import pandas as pd

    cols = ["alpha_median", "alpha_ks", "num_spikes"]
    frames = {}
    for label, path in (("pretrained", pretrained), ("random init", random)):
        df = pd.read_parquet(path, columns=["module", "status", *cols])
        df = df[df.status == "ok"]
        df["kind"] = df.module.str.rsplit(".", n=1).str[-1]
        frames[label] = df.groupby("kind")[cols].median()
    table = pd.concat(frames, axis=1).swaplevel(axis=1)[[(c, s) for c in cols for s in frames]]
    order = [k for k in (*KINDS, "embed_tokens", "lm_head") if k in table.index]
    return table.loc[order]


def base_loss(model_dir: Path, data: Path, max_length: int = 128) -> float:
    """The model's loss on a prompt/completion file with no adapter: the mean negative
    log-likelihood per completion token (the completion's tokens and the EOS TRL appends, in a
    sequence cut at ``max_length``), over every token of the file. A reference for the arms'
    losses, computed here and not by TRL's evaluation loop (which averages per batch)."""
    import json

    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for line in data.read_text().splitlines():
            rec = json.loads(line)
            prompt = tok(rec["prompt"], add_special_tokens=False)["input_ids"]
            full = tok(rec["prompt"] + rec["completion"], add_special_tokens=False)["input_ids"]
            full = [*full, tok.eos_token_id][:max_length]
            labels = torch.tensor([-100] * len(prompt) + full[len(prompt) :])
            if (labels[1:] != -100).sum() == 0:
                continue
            logits = model(torch.tensor([full])).logits[0, :-1]
            nll = torch.nn.functional.cross_entropy(logits, labels[1:], reduction="sum",
                                                    ignore_index=-100)  # fmt: skip
            total += nll.item()
            count += int((labels[1:] != -100).sum())
    return total / count


def markdown(df) -> str:
    """A pipe table (pandas' to_markdown needs tabulate, which esdtool does not install)."""
    head = ["kind", *df.columns]
    rows = [
        [str(i), *(f"{v:.2f}" for v in r)] for i, r in zip(df.index, df.to_numpy(), strict=True)
    ]
    lines = [head, ["---"] * len(head), *rows]
    return "".join("| " + " | ".join(cells) + " |\n" for cells in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", nargs="?", type=Path, default=Path("/tmp/stdlib-study"))
    parser.add_argument("--esdtool", default=shutil.which("esdtool") or "esdtool")
    ns = parser.parse_args()
    out: Path = ns.outdir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache = HERE / ".cache" / "stdlib-llama"
    model, random = cache / "pretrained", cache / "random-init"

    sh([sys.executable, str(HERE / "pretrain_stdlib.py"), "--cache-dir", str(cache)])
    pre_pq, rnd_pq = out / "pretrained.parquet", out / "random-init.parquet"
    sh([ns.esdtool, "analyze", str(model), "-o", str(pre_pq)])
    sh([ns.esdtool, "analyze", str(random), "-o", str(rnd_pq)])
    table = alpha_table(pre_pq, rnd_pq)
    table.to_csv(out / "alpha_table.csv")
    flat = table.copy()
    flat.columns = [f"{c} {s}" for c, s in flat.columns]
    (out / "alpha_table.md").write_text(markdown(flat))
    print(flat.round(2).to_string())

    sh([sys.executable, str(HERE / "stdlib_task.py"), str(out / "task")])
    for split in ("eval", "test"):
        for label, path in (("pretrained", model), ("random init", random)):
            loss = base_loss(path, out / "task" / f"{split}.jsonl")
            print(f"{label} model, no adapter: {split} loss {loss:.4f} (per completion token)")
    task, trials = out / "task", out / "ablation"
    sh([ns.esdtool, "ablate", str(model), "--metrics", str(pre_pq),
        "--data", str(task / "train.jsonl"), "--eval-data", str(task / "eval.jsonl"),
        "--test-data", str(task / "test.jsonl"), "-o", str(trials), *ABLATE])  # fmt: skip
    print(f"summary: {trials / 'summary.csv'}; page: {trials / 'ablation.html'}")


if __name__ == "__main__":
    main()
