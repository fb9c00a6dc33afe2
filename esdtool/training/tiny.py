"""A tiny causal LM made on the spot, for trying every command offline: a 2-layer Llama with
RANDOM weights and a small byte-level BPE tokenizer (with a chat template) trained on
arithmetic sentences. Its spectra and plans mean nothing; it only lets ``analyze``,
``allocate`` and ``finetune`` run end to end without the hub.

    python -m esdtool.training.tiny ./tiny-lm
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from esdtool.errors import EsdtoolError, OutputError
from esdtool.extras import require
from esdtool.untrusted import printable

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
NOTE = "RANDOM WEIGHTS: a stand-in made by esdtool.training.tiny for trying the commands offline"


def make_tiny_causal_lm(
    directory: str | os.PathLike[str], *, seed: int = 0, initializer_range: float = 0.5
) -> Path:
    """Save a 2-layer Llama (hidden 64) with random weights and its tokenizer to ``directory``
    (new, empty, or an earlier tiny model's), marked as random in config.json and a README.md.
    A directory holding anything else is refused: its files would be replaced."""
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: is a file, not a directory")
    readme = out / "README.md"
    ours = readme.is_file() and NOTE in readme.read_text(errors="replace")
    if out.is_dir() and any(out.iterdir()) and not ours:
        raise OutputError(
            f"{out}: is not empty, and the tiny model's files would replace what is there",
            hint="give a new or empty directory",
        )
    stack = require("making a tiny causal LM", "transformers", "tokenizers")
    transformers = stack["transformers"]
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = [f"Q: what is {a} plus {b}? A: {a + b}." for a in range(20) for b in range(20)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>",
    )  # fmt: skip
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
        initializer_range=initializer_range, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    try:
        transformers.LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot write the model ({exc.strerror or exc})") from exc
    tokenizer.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())
    saved["esdtool_note"] = NOTE
    (out / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
    (out / "README.md").write_text(f"# {NOTE}\n")
    return out


USAGE = "usage: python -m esdtool.training.tiny DIRECTORY (a new or empty directory)"

if __name__ == "__main__":  # python -m esdtool.training.tiny DIR
    if len(sys.argv) == 2 and sys.argv[1] in ("-h", "--help"):
        print(f"{USAGE}\n\n{__doc__.strip()}")
        sys.exit(0)
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):  # an option, not a directory name
        sys.exit(USAGE)
    try:
        make_tiny_causal_lm(sys.argv[1])
    except EsdtoolError as exc:  # one line, exit 2, as the CLI's errors
        print(f"Error: {printable(exc)}", file=sys.stderr)
        sys.exit(2)
