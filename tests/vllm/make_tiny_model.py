"""Build a tiny, random, deterministic Llama model that vLLM can serve offline.

Usage::

    python make_tiny_model.py OUTDIR [--head-dim N] [--seed N]

OUTDIR receives a complete Hugging Face model folder: ``config.json``,
``generation_config.json``, ``model.safetensors`` (about 1.8 MB, float32),
``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

Nothing is downloaded. The tokenizer is a byte-level BPE built here without
training: 3 special tokens + 256 byte tokens + 253 fixed merges = 512, exactly
the model's vocabulary, so every id the random model can emit has a token
(random byte sequences may decode to U+FFFD). The weights are drawn from a seeded
``torch.Generator``: the same seed, head size and torch version give the same bytes.

The model writes gibberish; it exists to exercise a real inference server. A head
size of 64 (the default) is served by vLLM's CPU attention backend; 16 loads but
kills vLLM's CPU engine on the first request ("Unsupported CPU attention
configuration"), which makes an "engine dies while serving" case.

Run it with an interpreter that has vLLM installed: it needs torch, transformers,
tokenizers and safetensors, which vLLM brings. It is a script for the ``vllm`` nox
session, not a module of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

HIDDEN_SIZE = 128
INTERMEDIATE_SIZE = 256
NUM_LAYERS = 2
NUM_HEADS = 2
VOCAB_SIZE = 512
MAX_POSITIONS = 512

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [BOS, EOS, PAD]  # ids 0, 1, 2

#: Jinja chat template: ``<s><|user|>\nhi</s>\n<|assistant|>\n``.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def build_tokenizer() -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` with exactly ``VOCAB_SIZE`` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 symbols
    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS + alphabet:
        vocab[token] = len(vocab)

    # Fixed merges of two frequent symbols ("\u0120" is the byte-level space).
    symbols = [*"etaoinshrdlucmfwypvbgk", "\u0120"]
    merges: list[tuple[str, str]] = []
    for a in symbols:
        for b in symbols:
            if len(vocab) >= VOCAB_SIZE:
                break
            if a + b not in vocab:
                merges.append((a, b))
                vocab[a + b] = len(vocab)
    if len(vocab) != VOCAB_SIZE:
        raise RuntimeError(f"tokenizer vocabulary is {len(vocab)}, expected {VOCAB_SIZE}")

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, vocab[BOS])],
    )
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return tokenizer


def build_model(head_dim: int, seed: int) -> Any:
    """A ``LlamaForCausalLM`` of the sizes above, its weights drawn from ``seed``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number, got {head_dim}")
    hf_logging.disable_progress_bar()
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_HEADS,
        head_dim=head_dim,  # explicit, so it need not be hidden_size / heads
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
        dtype="float32",
    )
    model = LlamaForCausalLM(config).to(torch.float32)

    # Every tensor is filled here from one seeded generator, in name order, so the
    # weights do not depend on transformers' initialisation scheme.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                param.copy_(noise * 0.02)
    model.eval()
    return model


def write_tokenizer_files(outdir: Path, tokenizer: Any) -> None:
    """``tokenizer.json`` and the two small files transformers reads beside it."""
    tokenizer.save(str(outdir / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "add_bos_token": False,  # the post-processor adds it
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS,
        "chat_template": CHAT_TEMPLATE,
    }
    (outdir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    (outdir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def make_tiny_model(outdir: str | os.PathLike[str], head_dim: int = 64, seed: int = 0) -> Path:
    """Write the tiny model to ``outdir`` (created if needed) and return its path."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_model(head_dim, seed)
    model.save_pretrained(str(out), safe_serialization=True)
    # Some transformers versions write tokenizer bits or a chat_template.jinja here:
    # the files written next are the ones that count.
    write_tokenizer_files(out, tokenizer)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: ``OUTDIR [--head-dim N] [--seed N]``; prints the model's path."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("outdir", help="directory to write the model into")
    parser.add_argument(
        "--head-dim",
        type=int,
        default=64,
        help="attention head size, even (default 64; 16 loads but kills vLLM's CPU engine "
        "on the first request)",
    )
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        path = make_tiny_model(args.outdir, head_dim=args.head_dim, seed=args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
