"""The architecture, checked: what each subpackage may import (docs/architecture.md).

(a) every module of patchkit.core imports without torch or transformers (each in a fresh process);
(b) an import graph of patchkit/, read with ast: only patchkit.share imports huggingface_hub, the
    module-level imports between patchkit's modules have no cycle, nothing outside patchkit.cli
    imports patchkit.cli, and each subpackage imports only the layers below it (LAYERS);
(c) no module uses another patchkit module's private name (`from .x import _y`, or `x._y` on an
    imported patchkit module).

Function-local imports (`def f(): from ..share.sources import resolve_patch`) are the way a module
reaches a heavy or optional dependency only when it is used; they do not count as cycles (they
run after every module involved is loaded), but they do count for (b)'s other rules and for (c).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import patchkit

PKG = Path(patchkit.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def package_of(name: str) -> str:
    return name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]


class Import:
    """One imported name: `module` (absolute), `name` (None for `import module`), whether the import
    is at module level, and the line."""

    def __init__(self, module: str, name: str | None, top: bool, line: int, bound: str):
        self.module, self.name, self.top, self.line, self.bound = module, name, top, line, bound

    def target(self) -> str:
        """The patchkit module this import loads (a submodule when `from package import submodule`)."""
        if self.name and f"{self.module}.{self.name}" in MODULES:
            return f"{self.module}.{self.name}"
        return self.module


def imports_of(name: str) -> list[Import]:
    tree = ast.parse(MODULES[name].read_text())
    top_level = {id(n) for n in tree.body}
    # an import under `if TYPE_CHECKING:` or try/except at module level is still module level
    for n in tree.body:
        if isinstance(n, (ast.If, ast.Try)):
            top_level |= {id(s) for s in ast.walk(n)}
    out = []
    for node in ast.walk(tree):
        top = id(node) in top_level
        if isinstance(node, ast.Import):
            for a in node.names:
                out.append(Import(a.name, None, top, node.lineno, a.asname or a.name.split(".")[0]))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_of(name).split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for a in node.names:
                out.append(Import(module, a.name, top, node.lineno, a.asname or a.name))
    return out


GRAPH = {name: imports_of(name) for name in MODULES}


def in_patchkit(module: str) -> bool:
    return module == "patchkit" or module.startswith("patchkit.")


# ---- (a) -------------------------------------------------------------------------------------------
CORE = sorted(n for n in MODULES if n == "patchkit.core" or n.startswith("patchkit.core."))


def assert_imports_without(module: str, heavy: tuple[str, ...]) -> None:
    """Import `module` in a fresh process; none of `heavy` may be in sys.modules after."""
    code = (f"import {module}, sys; heavy = [m for m in {heavy!r} if m in sys.modules]; "
            f"assert not heavy, f'importing {module} imported {{heavy}}'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("module", CORE)
def test_core_imports_without_torch(module):
    assert_imports_without(module, ("torch", "transformers"))


# The subpackages themselves, the numpy side of the method and the Hub modules load nothing heavy
# either: huggingface_hub only inside the functions that talk to the Hub.
LIGHT = ["patchkit", "patchkit.method", "patchkit.evaluation", "patchkit.share", "patchkit.cli",
         "patchkit.method.compute", "patchkit.method.select", "patchkit.core.choices", "patchkit.method.choices",
         "patchkit.evaluation.choices", "patchkit.evaluation.settings"] + \
        sorted(n for n in MODULES if n.startswith("patchkit.share."))


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_import_nothing_heavy(module):
    assert_imports_without(module, ("torch", "transformers", "huggingface_hub"))


# ---- (b) -------------------------------------------------------------------------------------------
def test_only_share_imports_huggingface_hub():
    bad = [f"{name}:{i.line}" for name, imps in GRAPH.items() for i in imps
           if i.module.split(".")[0] == "huggingface_hub" and not name.startswith("patchkit.share.")]
    assert not bad, f"huggingface_hub imported outside patchkit.share: {bad}"


def test_nothing_outside_cli_imports_cli():
    bad = [f"{name}:{i.line}" for name, imps in GRAPH.items() for i in imps
           if i.target().startswith("patchkit.cli") and not (name == "patchkit.cli" or name.startswith("patchkit.cli."))
           and name != "patchkit.__main__"]
    assert not bad, f"patchkit.cli imported from outside it: {bad}"


# Which subpackage may import which (docs/architecture.md): module-level imports, and in brackets
# what a function-local import may add (core reaches patchkit.share.sources only to turn an hf://
# reference into a local file, when one is given).
LAYERS = {
    "core": ({"core", "errors"}, {"share.sources"}),
    "share": ({"share", "core", "errors"}, set()),
    "method": ({"method", "core", "share", "errors"}, set()),
    "evaluation": ({"evaluation", "method", "core", "share", "errors"}, set()),
    # the command reads only its options' enums and eval/tune's settings at import (standard library
    # only), the rest inside the command functions
    "cli": ({"cli", "errors", "core.choices", "method.choices", "evaluation.choices", "share.choices", "evaluation.settings"},
            {"core", "method", "evaluation", "share"}),
}

# Function-local imports against LAYERS that are allowed, each with its reason: a list to shrink,
# not to grow (docs/architecture.md).
EXCEPTIONS = {
    ("patchkit.method.data", "patchkit.evaluation.selflabel"):
        "builtin:toxicity-self is a data set that the model generates and a judge labels (evaluation's "
        "selflabel); data.builtin_dataset reaches it only when that set is asked for",
}


def test_subpackages_import_only_the_layers_below():
    bad = []
    for name, imps in GRAPH.items():
        here = name.split(".")[1] if name.count(".") else None
        if here not in LAYERS:
            continue
        top_ok, local_ok = LAYERS[here]
        for i in imps:
            if not in_patchkit(i.module) or i.target() == "patchkit":
                continue
            there = i.target().split(".", 1)[1]
            if not i.top and (name, i.target()) in EXCEPTIONS:
                continue
            allowed = top_ok if i.top else top_ok | local_ok
            if not any(there == a or there.startswith(a + ".") for a in allowed):
                bad.append(f"{name}:{i.line} imports patchkit.{there}" + ("" if i.top else " (function-local)"))
    assert not bad, bad


def module_level_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, imps in GRAPH.items():
        for i in imps:
            if not (i.top and in_patchkit(i.module)):
                continue
            target = i.target()
            if target in MODULES and target != name:
                edges[name].add(target)
            # importing patchkit.a.b runs patchkit/__init__.py and patchkit/a/__init__.py first
            parts = target.split(".")
            for k in range(1, len(parts)):
                parent = ".".join(parts[:k])
                if parent in MODULES and parent != name and not name.startswith(parent + "."):
                    edges[name].add(parent)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycle_at_module_level():
    cycle = find_cycle(module_level_edges())
    assert cycle is None, " -> ".join(cycle)


def test_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


# ---- (c) -------------------------------------------------------------------------------------------
def private_uses(name: str) -> list[str]:
    found = []
    for i in GRAPH[name]:
        if in_patchkit(i.module) and i.name and i.name.startswith("_") and not i.name.startswith("__") \
                and i.target() == i.module:
            found.append(f"{name}:{i.line} from {i.module} import {i.name}")
    # `x._y` where x is a patchkit module this file imported
    modules = {i.bound: i.target() for i in GRAPH[name] if in_patchkit(i.module) and i.target() in MODULES}
    tree = ast.parse(MODULES[name].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules \
                and node.attr.startswith("_") and not node.attr.startswith("__"):
            found.append(f"{name}:{node.lineno} {node.value.id}.{node.attr} ({modules[node.value.id]})")
    return found


def test_no_module_uses_another_modules_private_names():
    bad = [use for name in MODULES for use in private_uses(name)]
    assert not bad, bad


def test_the_command_imports_no_numpy():
    """`run` sets OPENBLAS_NUM_THREADS for the element-wise commands before numpy is first imported:
    importing patchkit.cli (as the console script and `python -m patchkit` do) must not import it."""
    assert_imports_without("patchkit.cli", ("numpy",))


# ---- one of each ------------------------------------------------------------------------------------
def calls_of(attr: str, owner: str | None = None) -> list[str]:
    """Where `owner.attr(...)` (or, without owner, a bare `attr(...)`) is called in patchkit, as module:function."""
    found = []
    for name, path in MODULES.items():
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if not isinstance(node, ast.Call):
                    continue
                f = node.func
                if owner is None and isinstance(f, ast.Name) and f.id == attr:
                    found.append(f"{name}:{fn.name}")
                elif owner is not None and isinstance(f, ast.Attribute) and f.attr == attr \
                        and isinstance(f.value, ast.Name) and f.value.id == owner:
                    found.append(f"{name}:{fn.name}")
    return sorted(set(found))


def test_one_model_loader():
    """Every causal LM patchkit runs (probe, eval, tune, self-labelling, the embedded models) is loaded by one function."""
    assert calls_of("from_pretrained", "AutoModelForCausalLM") == ["patchkit.method.pipeline:load_model"]


def test_one_patch_resolver():
    """A patch reference (a Patch, a path, hf://...) becomes a Patch in one function, core.plan.load_patch:
    no other function resolves a reference and loads it itself."""
    both = set(calls_of("load", "Patch")) & set(calls_of("resolve_patch"))
    assert both == {"patchkit.core.plan:load_patch"}


def test_one_capability_meter():
    """Perplexity and KL on benign text are measured in one place (eval reports what tune budgets)."""
    users = {f for name in ("token_nll", "kl_sum") for f in calls_of(name) + calls_of(name, "J")}
    assert {u.partition(":")[0] for u in users} == {"patchkit.evaluation.capability"}


def test_one_output_exists_check():
    """Outside core (whose writers keep their own messages for now), an output is checked by OutputExistsError.check."""
    raising = [f"{name}:{node.lineno}" for name, path in MODULES.items() if not name.startswith("patchkit.core")
               for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name)
               and node.exc.func.id == "OutputExistsError"]
    assert not raising, raising
    checks = set(calls_of("check", "OutputExistsError"))
    assert {"patchkit.cli.core:diff", "patchkit.cli.method:compute", "patchkit.evaluation.tune:tune",
            "patchkit.evaluation.evaluate:attach_evaluation", "patchkit.share.export:export_peft"} <= checks, checks


def test_one_model_reference_parser():
    """No module splits a model reference at '@' by hand: share.hub parses it (for share.sources.parse_model)."""
    bad = [f"{name}:{node.lineno}" for name, path in MODULES.items() if name != "patchkit.share.hub"
           for node in ast.walk(ast.parse(path.read_text()))
           if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("split", "partition")
           and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == "@"]
    assert not bad, bad
