"""The capability meter: perplexity and mean next-token KL(base || patched) on benign text.

`patchkit eval` and `patchkit tune` measure with this one meter, so that tune's budget is what eval
reports (same tokenisation, batches and sums). The base model's logits are computed once per batch
and kept (up to `keep_bytes`, then recomputed); each patch is applied in memory per batch and
reverted. A batch whose float32 logits would pass `LOGITS_BYTES` is run a few texts at a time (the
same padded length): a 262k-token vocabulary (Gemma 3) makes 2 GB of logits for 16 texts of 128
tokens, and the KL's temporaries several times that. Sums are unchanged by the split, up to the
order of float additions; batches under the bound run as they always have.
"""

from __future__ import annotations

import math

import torch

from ..core.patchfile import Patch
from .inmemory import apply_in_memory, revert_in_memory
from .judges import kl_sum, token_nll

LOGITS_BYTES = 512 << 20  # float32 logits of one forward pass, at most (16 x 128 tokens x 49,152 is 403 MB)


def perplexity(nll: float, tokens: int) -> float | None:
    """exp(mean NLL); None without tokens; inf past what a float holds, and for a NaN (a broken
    model): over any budget."""
    if not tokens:
        return None
    x = nll / tokens
    return math.exp(x) if x < 700 else math.inf


class CapabilityMeter:
    """Measures patches against the base model on `texts`; `base` holds the base's own numbers."""

    def __init__(self, model, tok, texts: list[str], batch_size: int, max_length: int = 128, keep_bytes: int = 1 << 30):
        tok.padding_side = "right"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self.model, self.texts, self.batches, self.base_logits = model, len(texts), [], []
        nll, n, m, kept = 0.0, 0, 0, 0
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                whole = tok(texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
                for enc in pieces(whole, vocab_size(model)):
                    logits = model(**enc).logits
                    s, c = token_nll(logits, enc["input_ids"], enc["attention_mask"])
                    nll, n, m = nll + s, n + c, m + int(enc["attention_mask"].sum())
                    kept += logits.numel() * logits.element_size()
                    self.batches.append(enc)
                    self.base_logits.append(logits if kept <= keep_bytes else None)
                    del logits
        self.tokens = n
        self.base = {"perplexity": perplexity(nll, n), "kl": 0.0 if m else None, "tokens": n, "texts": self.texts}

    @property
    def base_perplexity(self) -> float | None:
        return self.base["perplexity"]

    def measure(self, patch: Patch) -> dict:
        """{"perplexity", "kl", "tokens", "texts"} of the model with `patch` applied (reverted after each batch)."""
        nll, n, kl, m = 0.0, 0, 0.0, 0
        with torch.no_grad():
            for enc, base in zip(self.batches, self.base_logits):
                base = base if base is not None else self.model(**enc).logits
                undo = apply_in_memory(self.model, patch)
                try:
                    logits = self.model(**enc).logits
                finally:
                    revert_in_memory(self.model, undo)
                s, c = token_nll(logits, enc["input_ids"], enc["attention_mask"])
                k, c2 = kl_sum(base, logits, enc["attention_mask"])
                nll, n, kl, m = nll + s, n + c, kl + k, m + c2
        return {"perplexity": perplexity(nll, n), "kl": kl / m if m else None, "tokens": n, "texts": self.texts}


def vocab_size(model) -> int:
    """The width of the model's logits (its output embedding's rows, else the config's vocab_size)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(getattr(model.config, "vocab_size", 0) or 1)


def pieces(enc, vocab: int, limit: int | None = None) -> list:
    """`enc` (a tokenised batch) as consecutive groups of texts whose float32 logits stay under `limit`
    bytes (LOGITS_BYTES): the whole batch when it fits, else as many texts as fit (one at least)."""
    limit = LOGITS_BYTES if limit is None else limit
    rows, length = enc["input_ids"].shape
    per = max(1, limit // max(1, length * vocab * 4))
    if per >= rows:
        return [enc]
    return [{k: v[i : i + per] for k, v in enc.items()} for i in range(0, rows, per)]
