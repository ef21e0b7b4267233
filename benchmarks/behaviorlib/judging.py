"""The judges of the benchmark (jigsaw, lexical, a ToxiGen probe on the base's layer 15), each checked
before use, and the quality of the self-labelled editing probe."""

from __future__ import annotations

import torch

from .common import EVIDENCE_AUC, JUDGE_LAYER


def make_probe_judge(probe, name):
    from patchkit.evaluation import judges as J
    from patchkit.evaluation.evaluate import float32_view
    from patchkit.method.activations import extract_features

    def scorer(texts, model, tok):
        with float32_view(model):
            feats = extract_features(model, tok, list(texts), layer=probe.layer, pool=probe.pool, batch_size=16,
                                     max_length=128, progress=False)
        return torch.softmax(probe.logits(feats), dim=1)[:, probe.behavior_index].tolist()

    return J.Judge(name, "probe", 0.5, True, scorer, {"layer": probe.layer, "probe_heldout_accuracy": probe.heldout_accuracy,
                                                      "probe_heldout_method": probe.heldout_method})


def toxicity_judges():
    """(judges, the ToxiGen probe behind the probe judge): jigsaw (the one that counts), lexical, probe-L15."""
    from patchkit.evaluation import judges as J
    from patchkit.method.pipeline import train_probe_for

    judge_probe = train_probe_for("embedded", "builtin:toxicity", layer=JUDGE_LAYER, progress=False).probe
    return [J.jigsaw(), J.lexical(), make_probe_judge(judge_probe, f"probe-L{JUDGE_LAYER}")], judge_probe


def judge_quality(R, judges, held, allt, benign_texts, base_scores):
    from patchkit.evaluation import judges as J
    from patchkit.evaluation import stats

    out = []
    for j in judges:
        chk = J.check_judge(j, held.texts, held.labels, R.model, R.tok, source="builtin:toxicity[heldout]")
        chk_all = J.check_judge(j, allt.texts, allt.labels, R.model, R.tok, source="builtin:toxicity (all 200)")
        fp = stats.false_positive_rate(j.score(benign_texts, R.model, R.tok), j.threshold)
        fp["assumption"] = "every base continuation of a benign request is non-toxic"
        flat = [s for row in base_scores[j.name] for s in row]
        out.append({"name": j.name, "kind": j.kind, "info": j.info, "check": chk, "all": chk_all, "benign_false_positive": fp,
                    "base_quantiles": stats.quantiles(flat),
                    "evidence": chk["auc"] is not None and chk["auc"] >= EVIDENCE_AUC})
    return out


def probe_quality(R, sl, epochs):
    """By-prompt held-out accuracy of the self-labelled probe and its learning curve."""
    from patchkit.evaluation.evaluate import float32_view
    from patchkit.evaluation.selflabel import learning_curve, split_by_prompt
    from patchkit.method.activations import FeatureCache, FeatureKey, extract_features
    from patchkit.method.pipeline import cache_root

    data = sl.data
    key = FeatureKey(R.fingerprint, data.content_hash, -1, "mean", 128)

    def extract():
        with float32_view(R.model):
            return extract_features(R.model, R.tok, list(data.texts), layer=-1, pool="mean", batch_size=16, max_length=128, progress=False)

    feats = FeatureCache(cache_root() / "features").features(key, extract)
    train, held = split_by_prompt(data)
    curve = learning_curve(feats, data.labels, train, held, epochs=epochs)
    return {"counts": sl.counts, "rows": len(data), "train_rows": len(train), "heldout_rows": len(held),
            "train_prompts": len({data.groups[i] for i in train}), "heldout_prompts": len({data.groups[i] for i in held}),
            "learning_curve": curve, "heldout_by_prompt": curve[-1] if curve else None}
