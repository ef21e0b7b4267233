"""Tiny random models and checkpoints for tests, built from transformers configs; nothing is downloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

WORDS = (
    "the a an of to and in is was for on that with as by at from it this be are or his her they we you "
    "good bad kind cruel people group love hate help hurt friend enemy nice awful calm angry happy sad "
    "city river music food book dog cat day night water fire stone tree house road car red blue green"
).split()


def make_tokenizer():
    """A word-level tokenizer over a fixed vocabulary, with pad, bos, eos and unk tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def make_model(config, seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random init of transformers is small; widen norms and biases so that edits show in logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype).eval()


def save_checkpoint(model, path: Path, shard_size: str | None = None, tokenizer=True) -> Path:
    """Save as a Hugging Face safetensors checkpoint; `shard_size` (for example "20KB") forces shards."""
    path = Path(path)
    kwargs = {"safe_serialization": True}
    if shard_size:
        kwargs["max_shard_size"] = shard_size
    model.save_pretrained(path, **kwargs)
    if tokenizer:
        make_tokenizer().save_pretrained(path)
    return path


def tiny_llama(path: Path, dtype: torch.dtype = torch.bfloat16, sharded: bool = False, seed: int = 0, **cfg) -> Path:
    model = make_model(llama_config(**cfg), seed=seed, dtype=dtype)
    return save_checkpoint(model, path, shard_size="40KB" if sharded else None)


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file below `path` (relative name -> bytes), to compare folders bit for bit."""
    out = {}
    for root, _dirs, files in os.walk(path):
        for f in files:
            p = Path(root) / f
            out[str(p.relative_to(path))] = p.read_bytes()
    return out


def weight_files(path: Path) -> dict[str, bytes]:
    return {k: v for k, v in snapshot(path).items() if k.endswith(".safetensors") or k.endswith(".json")}


def read_json(p: Path):
    return json.loads(Path(p).read_text())
