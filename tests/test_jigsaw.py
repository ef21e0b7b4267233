"""The jigsaw judge: exact against the package's TensorFlow outputs, safe pickle reading, Keras
preprocessing, the judge itself, and check_judge's AUC."""

from __future__ import annotations

import importlib.metadata
import io
import importlib.util
import json
import os
import pickle
import pickletools
from collections import OrderedDict, defaultdict
from pathlib import Path

import numpy as np
import pytest

from patchkit.errors import DataError
from patchkit.evaluation import judges as J
from patchkit.evaluation.safepickle import PickledObject, read_restricted

REFERENCE = Path(__file__).parent / "data" / "jigsaw_reference.json"


def _installed() -> bool:
    try:
        importlib.metadata.distribution("toxic-comment-classifier")
    except importlib.metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec("h5py") is not None


needs_package = pytest.mark.skipif(
    not _installed(), reason="needs toxic-comment-classifier and h5py: pip install --no-deps toxic-comment-classifier==0.3.0 h5py")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """One tokenizer conversion for the whole module, in a private cache folder."""
    monkeypatch.setenv("PATCHKIT_CACHE", str(tmp_path_factory.getbasetemp() / "jigsaw-cache"))


# ------------------------------------------------------------------------------- (a) exactness
@needs_package
def test_all_six_outputs_match_the_tensorflow_reference():
    from patchkit.evaluation import jigsaw as JG

    ref = json.loads(REFERENCE.read_text(encoding="utf-8"))
    assert ref["labels"] == list(JG.LABELS) and ref["maxlen"] == JG.MAXLEN
    rows = ref["rows"]
    assert len(rows) >= 200 and {r["kind"] for r in rows} >= {"edge", "toxigen", "rtp", "benign"}
    got = JG.classify([r["text"] for r in rows], batch_size=64)
    want = np.array([r["scores"] for r in rows])
    err = np.abs(got - want)
    worst = int(err.max(axis=1).argmax())
    assert err.max() <= 1e-4, f"text {rows[worst]['text'][:60]!r}: {got[worst]} vs {want[worst]}"
    # the edge cases: the padded ids equal the ones Keras computed
    for r in rows:
        if "ids" in r:
            ids = JG.encode([r["text"]])[0]
            assert ids.shape == (JG.MAXLEN,) and ids.dtype == np.int32
            assert [int(i) for i in ids[ids != 0]] == r["ids"], r["text"][:60]
            assert not ids[: JG.MAXLEN - len(r["ids"])].any()


# ------------------------------------------------------------------------------ (b) safe pickle
class _RunsCode:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


class _Evals:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def test_refuses_a_pickle_that_would_run_code(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    data = pickle.dumps(_RunsCode(sentinel))
    with pytest.raises(DataError, match="not allowed"):
        read_restricted(data, frozenset({("keras.src.legacy.preprocessing.text", "Tokenizer")}))
    with pytest.raises(DataError, match="refused"):
        read_restricted(pickle.dumps({"a": [_RunsCode(sentinel)]}, protocol=2), frozenset())
    assert not sentinel.exists()


def test_refuses_unknown_globals_and_calls():
    allowed = frozenset({("keras.src.legacy.preprocessing.text", "Tokenizer")})
    with pytest.raises(DataError, match="builtins.eval"):
        read_restricted(pickle.dumps(_Evals()), allowed)
    with pytest.raises(DataError, match="not allowed"):  # a class by a name it does not have
        read_restricted(pickle.dumps(Path("/x")), allowed)
    # an allowed name used as a call: REDUCE of builtins.int, REDUCE of the Tokenizer class
    reduce_int = b"\x80\x04\x8c\x08builtins\x8c\x03int\x93\x8c\x015\x85R."
    with pytest.raises(DataError, match="builtins.int"):
        read_restricted(reduce_int, allowed)
    reduce_tok = b"\x80\x04\x8c#keras.src.legacy.preprocessing.text\x8c\tTokenizer\x93)R."
    with pytest.raises(DataError, match="REDUCE"):
        read_restricted(reduce_tok, allowed)
    with pytest.raises(DataError, match="malformed|STOP"):
        read_restricted(pickle.dumps({"a": 1})[:-3], allowed)


def test_reads_plain_data_and_a_named_object():
    value = {"a": [1, 2.5, None, True, "é"], "b": (1, (2, 3)), "c": OrderedDict(x=1), "d": defaultdict(int, y=2)}
    got = read_restricted(pickle.dumps(value), frozenset())
    assert got == {"a": [1, 2.5, None, True, "é"], "b": (1, (2, 3)), "c": {"x": 1}, "d": {"y": 2}}
    # NEWOBJ + BUILD of the allowed class, written by hand (no such class exists here)
    obj = (b"\x80\x04\x8c#keras.src.legacy.preprocessing.text\x8c\tTokenizer\x93)\x81"
           b"}(\x8c\x05lower\x88\x8c\tnum_words\x4d\x20\x4eu" b"b.")
    got = read_restricted(obj, frozenset({("keras.src.legacy.preprocessing.text", "Tokenizer")}))
    assert isinstance(got, PickledObject) and got.name == "Tokenizer" and got.state == {"lower": True, "num_words": 20000}
    pickletools.dis(obj, out=io.StringIO())  # the hand-written bytes are a valid pickle


@needs_package
def test_reads_the_real_tokenizer_and_caches_it():
    from patchkit.evaluation import jigsaw as JG
    from patchkit.method.embedded import cache_dir

    _, path = JG.package_files()
    d = JG.tokenizer_from_pickle(path.read_bytes(), str(path))
    assert d["class"] == "keras.src.legacy.preprocessing.text.Tokenizer"
    assert (d["num_words"], d["lower"], d["split"], d["char_level"], d["oov_token"]) == (20000, True, " ", False, None)
    assert d["filters"] == JG.KERAS_FILTERS and d["word_index_size"] > 200000
    assert len(d["word_index"]) == 19999 and d["word_index"]["the"] == 1 and max(d["word_index"].values()) == 19999
    tok = JG.load_tokenizer()
    cached = list((cache_dir() / "jigsaw").glob("tokenizer-*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text(encoding="utf-8"))["word_index"] == d["word_index"]
    assert JG.load_tokenizer().word_index == tok.word_index  # second time from the cache


# --------------------------------------------------------------------------- (c) preprocessing
def test_keras_word_splitting():
    from patchkit.evaluation.jigsaw import text_to_word_sequence as split

    assert split("Hello, World!") == ["hello", "world"]
    assert split("a.b-c_d  e\tf\ng") == ["a", "b", "c", "d", "e", "f", "g"]
    assert split("don't STOP") == ["don't", "stop"]  # the apostrophe is not a filter
    assert split("a\rb\x0bc") == ["a\rb\x0bc"]  # \r and \v are neither filters nor the split
    assert split("!!! ???") == [] and split("") == []
    assert split("ÇA VA", lower=True) == ["ça", "va"] and split("ÇA", lower=False) == ["ÇA"]
    assert split("a|b", filters="", split="|") == ["a", "b"]


def test_keras_ids_and_padding():
    from patchkit.evaluation.jigsaw import KerasTokenizer, pad_sequences

    tok = KerasTokenizer({"the": 1, "cat": 2, "sat": 3, "rare": 7}, num_words=5)
    assert tok.texts_to_sequences(["The cat, the RARE dog sat!"]) == [[1, 2, 1, 3]]  # >= num_words and unknown dropped
    oov = KerasTokenizer({"<oov>": 1, "the": 2, "rare": 9}, num_words=5, oov_index=1)
    assert oov.texts_to_sequences(["the rare dog"]) == [[2, 1, 1]]
    chars = KerasTokenizer({"a": 1, "b": 2}, num_words=None, char_level=True)
    assert chars.texts_to_sequences(["AbC"]) == [[1, 2]]
    x = pad_sequences([[1, 2, 3], [], list(range(1, 8))], maxlen=5)
    assert x.dtype == np.int32 and x.tolist() == [[0, 0, 1, 2, 3], [0, 0, 0, 0, 0], [3, 4, 5, 6, 7]]  # pre, pre
    assert pad_sequences([list(range(1, 8)), [1]], maxlen=5, padding="post", truncating="post").tolist() == [
        [1, 2, 3, 4, 5], [1, 0, 0, 0, 0]]


@needs_package
def test_package_ids_keep_the_last_100_words():
    from patchkit.evaluation import jigsaw as JG

    ids = JG.encode(["idiot " + "the " * 150, "the " * 150 + "idiot", "the cat"])
    assert ids.shape == (3, 100)
    assert (ids[0] == 1).all()  # "idiot" was cut off with the first 50 words
    assert ids[1, -1] != 1 and (ids[1, :-1] == 1).all()
    assert (ids[2, :-2] == 0).all() and ids[2, -2] == 1


# ---------------------------------------------------------------------------------- (d) judge
@needs_package
def test_make_judge_jigsaw():
    j = J.make_judge("jigsaw")
    assert (j.name, j.kind, j.threshold, j.trained) == ("jigsaw", "jigsaw", 0.5, True) and "jigsaw" in J.KINDS
    bad, good, empty = j.score(["You are a stupid worthless idiot and I hate you", "Thank you, what a lovely day for a picnic.", ""])
    assert bad > 0.9 > 0.1 > good and empty == 0.0 and bad > good
    assert J.jigsaw().kind == "jigsaw"
    with pytest.raises(DataError, match="jigsaw"):
        J.make_judge("jigsaw:x")


def test_missing_package_says_how_to_install(monkeypatch):
    from patchkit.evaluation import jigsaw as JG

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(JG.importlib.metadata, "distribution", missing)
    with pytest.raises(DataError, match=r"pip install --no-deps toxic-comment-classifier==0\.3\.0"):
        JG.package_files()


# ------------------------------------------------------------------------------------ (e) AUC
def test_auc_rank_based():
    assert J.auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert J.auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert J.auc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5
    assert J.auc([0.1, 0.4, 0.4, 0.9], [0, 0, 1, 1]) == pytest.approx((1 + 1 + 0.5 + 1) / 4)  # one tied pair
    assert J.auc([0.3, 0.7], [1, 1]) is None
    # equals the pairwise definition on random data with many ties
    rng = np.random.default_rng(0)
    s, y = rng.integers(0, 5, 60) / 4, rng.integers(0, 2, 60)
    pairs = [(a > b) + 0.5 * (a == b) for a, ya in zip(s, y) for b, yb in zip(s, y) if ya == 1 and yb == 0]
    assert J.auc(s, y) == pytest.approx(np.mean(pairs))


def test_check_judge_reports_auc():
    j = J.Judge("t", "lexical", 0.5, False, lambda texts, _m, _t: [float(t.count("x")) / 3 for t in texts])
    c = J.check_judge(j, ["xxx", "xx", "x", "a"], [1, 1, 0, 0], source="hand")
    assert c["auc"] == 1.0 and c["accuracy"] == 1.0
    assert set(c) >= {"data", "n", "accuracy", "balanced_accuracy", "recall", "specificity", "auc"}
