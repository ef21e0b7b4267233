"""What a `tune` search sets and measures, and the searches of the other methods' strength.

A point (`Measured`) is one patch measured on the benign text and, within budget, judged; its kind adds what
its search set: `Point` (the probe edit: K rows, strength alpha), `LamPoint` (a projection's lam),
`FractionPoint` (the fraction of MLP neurons damping may scale down). `tune.tune(method=...)` runs every
search on one `tune.Bench`; the probe edit's search is in tune.py, the projection's and damping's here.

Both search one strength above 0 (`StrengthSearch`): the grid, then bisection between the largest strength
within budget (or 0) and the next grid strength, `refine` steps, as tune does on alpha. The expensive part is
done once, on the base loaded for the search and widened to float32 (as `patchkit compute --method ...` loads
it): a projection's directions (`layer_features`, `directions_from_features`), damping's neuron AUROCs
(`neuron_activations`, `auroc`). Each strength's patch is then `projection_patch(lam=..., directions=...)` or
`damping_patch(fraction=..., aurocs=...)`, built in memory; the chosen one is written as measured, with the data
in its provenance: the patch `patchkit compute --method projection --lam LAM` (or `damping --fraction F`)
writes for the same data. See docs/tune.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields


from ..core.choices import values
from ..core.patchfile import Patch
from ..errors import DataError, UnsupportedError
from ..method.choices import EditMethod
from ..method.damping import UP, auroc, damping_patch, neuron_activations
from ..method.pipeline import load_data
from ..method.projection import directions_from_features, layer_features, projection_patch
from ..method.targets import parse_layers, residual_writers
from . import evaluate as E

METHODS = tuple(values(EditMethod))
MODULES = {"both": ("mlp", "attn"), "mlp": ("mlp",), "attn": ("attn",)}  # the values of method.choices.Modules
DEFAULT_LAMS = (0.25, 0.5, 0.75, 1.0)
DEFAULT_DAMPING = (0.01, 0.03, 0.1, 0.3, 1.0)


@dataclass(kw_only=True)
class Measured:
    """One patch of a search, measured on the benign text and, within budget, judged."""

    stage: str  # grid | refine
    perplexity: float
    ppl_increase: float  # perplexity / base perplexity - 1
    kl: float
    edit_norm: float
    within_budget: bool
    over: list[str] = field(default_factory=list)  # which budgets it exceeds: ppl, kl
    judged: bool = False
    score: float | None = None  # the judge metric the search optimises
    metrics: dict | None = None  # summarize() of the judge's scores

    to_dict = asdict

    def knobs(self) -> dict:
        """What the search set for this point, in field order."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in MEASURED}

    def label(self) -> str:
        name, value = next(iter(self.knobs().items()))
        return f"{name}={value:g}"


MEASURED = frozenset(f.name for f in fields(Measured))


@dataclass
class Point(Measured):
    """The probe edit: K rows (a fraction of all target rows), strength alpha."""

    k: int
    fraction: float
    alpha: float

    def label(self) -> str:
        return f"K={self.k} alpha={self.alpha:g}"


@dataclass
class LamPoint(Measured):
    """A projection of strength lam; `rows`: the rows of the residual writers it edits."""

    lam: float
    rows: int


@dataclass
class FractionPoint(Measured):
    """Damping of at most `fraction` of all MLP neurons; `rows`: the neurons (up_proj rows) it damps."""

    fraction: float
    rows: int


# the columns of what each search sets (header, key, format), by settings["method"] (absent: the probe edit)
KNOBS = {"probe": (("K", "k", "d"), ("fraction", "fraction", ".4f"), ("alpha", "alpha", "g")),
         "projection": (("lam", "lam", "g"), ("rows", "rows", "d")),
         "damping": (("fraction", "fraction", "g"), ("rows", "rows", "d"))}


def bisect_edge(grid: Sequence[tuple[float, bool]], steps: int, within: Callable[[float], bool]) -> None:
    """Bisection between the largest strength within budget of a sorted grid [(strength > 0, within budget)]
    (or 0) and the next one: `steps` midpoints, each measured by `within(strength)`."""
    ok = [i for i, (_, w) in enumerate(grid) if w]
    nxt = ok[-1] + 1 if ok else 0
    if nxt >= len(grid):
        return
    lo, hi = (grid[ok[-1]][0] if ok else 0.0), grid[nxt][0]
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if within(mid) else (lo, mid)


def to_judge(table: Sequence[Measured], group: Callable, size: Callable) -> list[Measured]:
    """The grid points within budget, and in each group the largest (by `size`) refined point within budget."""
    out = [p for p in table if p.within_budget and p.stage == "grid"]
    for g in sorted({group(p) for p in table}):
        top = max((p for p in table if group(p) == g and p.within_budget), key=size, default=None)
        if top is not None and top.stage == "refine":
            out.append(top)
    return out


class StrengthSearch:
    """The search of one strength above 0 on a bench (tune.Bench): its grid, then bisection toward the edge of the
    budget. A method gives `name` (the strength's), `kind` (its point), `prepare` and `make` (a strength's patch)."""

    method: str
    name: str
    kind: type
    hint: str

    def __init__(self, bench, data, grid: Sequence[float], valid: Callable[[float], bool], rule: str):
        self.bench, self.grid = bench, sorted({float(x) for x in grid})
        if not self.grid or not all(math.isfinite(x) and valid(x) for x in self.grid):
            raise DataError(f"{self.name} values must be {rule}")
        self.data = load_data(data, model=bench.path) if isinstance(data, str) else data
        if len(set(self.data.labels)) < 2:
            raise DataError(f"the {self.method} search needs labelled data with both labels; {self.data.source} has one")
        self.patches: dict[float, Patch] = {}

    def patch(self, strength: float) -> Patch:
        if strength not in self.patches:
            self.patches[strength] = self.make(strength)
        return self.patches[strength]

    def build(self, p: Measured) -> Patch:
        return self.patch(getattr(p, self.name))

    def measure(self, strength: float, stage: str) -> Measured:
        patch = self.patch(strength)
        return self.bench.measure(patch, self.kind, stage, **{self.name: strength, "rows": patch.rows})

    def run(self, refine: int) -> None:
        for s in self.grid:
            self.measure(s, "grid")
        bisect_edge([(getattr(p, self.name), p.within_budget) for p in self.bench.table], refine,
                    lambda s: self.measure(s, "refine").within_budget)

    @property
    def what(self) -> str:  # what a point sets, for the error when none is within budget
        return self.name

    def group(self, _p: Measured) -> int:
        return 0

    def order(self, p: Measured) -> float:
        return getattr(p, self.name)

    size = order

    def data_info(self) -> dict:
        return {"source": self.data.source, "sha256": self.data.content_hash, "examples": len(self.data)}

    def final(self, best: Measured, _seed: int) -> Patch:
        """The chosen patch, as measured, with the data in its provenance (as compute writes it)."""
        out = self.build(best)
        out.provenance = {**out.provenance, "data": self.data_info()}
        return out

    def settings(self) -> dict:
        return {"method": self.method, self.name + "s": self.grid, "layers": self.layers, "data": self.data_info()}


class ProjectionSearch(StrengthSearch):
    """lam of `projection_patch`, on directions computed once."""

    method, name, kind, hint = "projection", "lam", LamPoint, "smaller lams, fewer layers or a lower rank"

    def __init__(self, bench, data, lams=None, layers=None, rank: int = 1, modules=("mlp", "attn")):
        super().__init__(bench, data, DEFAULT_LAMS if lams is None else lams, lambda x: x > 0, "finite and above 0")
        self.modules = MODULES[modules] if isinstance(modules, str) and modules in MODULES else tuple(modules)
        if int(rank) < 1 or not set(self.modules) <= {"mlp", "attn"}:
            raise DataError("rank must be 1 or more, and modules mlp, attn or both")
        self.rank = int(rank)
        self.all_layers = sorted({l for l, _, _ in residual_writers(bench.ck, self.modules)})
        self.layers = self.all_layers if layers is None else parse_layers(layers)
        missing = sorted(set(self.layers) - set(self.all_layers))
        if missing:
            raise DataError(f"layer {missing[0]} has no residual-writing tensor (layers {self.all_layers[0]}..{self.all_layers[-1]})")

    def prepare(self) -> None:
        b = self.bench
        with E.float32_view(b.net):
            feats = layer_features(b.net, b.tok, self.data.texts, self.all_layers if self.rank > 1 else self.layers)
        self.directions, self.quality = directions_from_features(feats, self.data.labels, self.layers, self.rank)

    def make(self, lam: float) -> Patch:
        return projection_patch(self.bench.ck, lam=lam, layers=self.layers, rank=self.rank, modules=self.modules,
                                directions=self.directions, quality=self.quality)

    def settings(self) -> dict:
        return {**super().settings(), "rank": self.rank, "modules": sorted(self.modules)}


class DampingSearch(StrengthSearch):
    """The fraction of `damping_patch`, on neuron AUROCs computed once."""

    method, name, kind, hint = "damping", "fraction", FractionPoint, "smaller fractions or fewer layers"

    def __init__(self, bench, data, fractions=None, layers=None):
        super().__init__(bench, data, DEFAULT_DAMPING if fractions is None else fractions, lambda x: 0 < x <= 1, "in (0, 1]")
        ups = sorted({int(m.group("layer")) for n in bench.ck.tensors if (m := UP.search(n))})
        if not ups:
            raise UnsupportedError(f"{bench.ck.path} has no mlp.up_proj tensors: damping handles gated (Llama-style) MLPs only")
        self.layers = ups if layers is None else parse_layers(layers)
        missing = sorted(set(self.layers) - set(ups))
        if missing:
            raise DataError(f"layer {missing[0]} has no mlp.up_proj tensor (layers {ups[0]}..{ups[-1]})")

    def prepare(self) -> None:
        b = self.bench
        with E.float32_view(b.net):
            acts = neuron_activations(b.net, b.tok, self.data.texts)
        self.aurocs = {l: auroc(acts[l], self.data.labels) for l in self.layers}

    def make(self, fraction: float) -> Patch:
        return damping_patch(self.bench.ck, aurocs=self.aurocs, fraction=fraction, layers=self.layers)


SEARCHES = {"projection": ProjectionSearch, "damping": DampingSearch}

__all__ = ["DampingSearch", "FractionPoint", "KNOBS", "LamPoint", "METHODS", "Measured", "Point", "ProjectionSearch",
           "SEARCHES", "StrengthSearch", "bisect_edge", "to_judge"]
