"""compute: the paper's edit as a patch, checked against the in-memory reference edit bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from patchkit.cli import cli
from patchkit.core import ops
from patchkit.core.checkpoint import Checkpoint
from patchkit.errors import ProbeError, UnsupportedError
from patchkit.method.compute import compute_patch
from patchkit.method.probe import Probe, save_probe
from patchkit.method.select import paper_k
from patchkit.method.targets import resolve_targets

ROOT = Path(__file__).resolve().parent.parent


def make_probe(ck: Checkpoint, seed: int = 3, fingerprint: bool = True) -> Probe:
    hidden = ck.config["hidden_size"]
    g = torch.Generator().manual_seed(seed)
    return Probe(
        weight=torch.randn(2, hidden, generator=g), bias=torch.zeros(2), label_names=("ok", "toxic"),
        model_fingerprint=ck.fingerprint() if fingerprint else "", n_examples=10, train_accuracy=1.0,
    )


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def reference_edit(base: dict[str, torch.Tensor], direction: torch.Tensor, alpha: float, k: int) -> tuple[dict, dict]:
    """The official recipe written plainly: score all gate rows, global top K by minus cosine, add alpha*v."""
    names = sorted((n for n in base if n.endswith("mlp.gate_proj.weight")), key=lambda n: int(n.split(".")[2]))
    scores = []
    for i, n in enumerate(names):
        w = base[n].float()
        cos = (w @ direction) / (w.norm(dim=1) * direction.norm())
        scores += [(-float(c), i, r) for r, c in enumerate(cos)]
    scores.sort(key=lambda t: (-t[0], t[1], t[2]))
    chosen: dict[str, list[int]] = {}
    for _, i, r in scores[:k]:
        chosen.setdefault(names[i], []).append(r)
    edited = dict(base)
    for n, rows in chosen.items():
        w = base[n].clone()
        idx = torch.tensor(sorted(rows))
        w[idx] = (w[idx].float() + alpha * direction).to(w.dtype)
        edited[n] = w
    return edited, {n: sorted(r) for n, r in chosen.items()}


@pytest.mark.parametrize("dtype,sharded", [("bf16", False), ("fp16", True), ("fp32", False)])
def test_applied_patch_equals_reference_edit_bit_for_bit(copy_ckpt, tmp_path, dtype, sharded):
    base = copy_ckpt(dtype, sharded)
    ck = Checkpoint(base)
    probe = make_probe(ck)
    patch = compute_patch(base, probe, top_k=17, alpha=1.08)
    assert patch.rows == 17 and all(e.encoding == "factored" for e in patch.edits.values())
    ops.apply([patch], base, tmp_path / "out")
    expected, chosen = reference_edit(load_all(base), probe.direction.float(), 1.08, 17)
    got = load_all(tmp_path / "out")
    assert {n: e.rows.tolist() for n, e in patch.edits.items()} == chosen
    for name, t in expected.items():
        assert torch.equal(got[name].view(torch.uint8), t.contiguous().view(torch.uint8)), name


def test_default_k_is_the_papers_fraction_and_sign_convention_holds(copy_ckpt):
    base = copy_ckpt("fp32", False)
    ck = Checkpoint(base)
    probe = make_probe(ck)
    patch = compute_patch(base, probe)
    total = sum(ck.info(n).n_rows for n in resolve_targets(ck).names)
    assert patch.rows == paper_k(total)
    v = probe.direction.double().numpy()
    tensors = load_all(base)
    worst_chosen, best_unchosen = -1.0, 1.0
    for name in resolve_targets(ck).names:
        w = tensors[name].double().numpy()
        cos = w @ v / (np.linalg.norm(w, axis=1) * np.linalg.norm(v))
        mask = np.zeros(len(w), bool)
        if name in patch.edits:
            mask[patch.edits[name].rows] = True
        if mask.any():
            worst_chosen = max(worst_chosen, cos[mask].max())
        if (~mask).any():
            best_unchosen = min(best_unchosen, cos[~mask].min())
    assert worst_chosen <= best_unchosen  # chosen rows are the most anti-aligned
    assert patch.provenance["params"]["k"] == patch.rows


def test_compute_is_deterministic_and_records_provenance(copy_ckpt, tmp_path):
    base = copy_ckpt("bf16", True)
    probe = make_probe(Checkpoint(base))
    a = compute_patch(base, probe, top_k=9, alpha=-0.5).to_bytes()
    b = compute_patch(base, probe, top_k=9, alpha=-0.5).to_bytes()
    assert a == b
    p = compute_patch(base, probe, top_k=9, alpha=-0.5)
    assert p.provenance["method"] == "model-surgery"
    assert p.provenance["params"]["alpha"] == -0.5 and p.provenance["probe"]["behavior"] == "toxic"


def test_controls_select_same_count_elsewhere(copy_ckpt):
    base = copy_ckpt("bf16", False)
    probe = make_probe(Checkpoint(base))
    paper = compute_patch(base, probe, top_k=12)
    rows = compute_patch(base, probe, top_k=12, strategy="random-rows", seed=1)
    direc = compute_patch(base, probe, top_k=12, strategy="random-direction", seed=1)
    assert rows.rows == direc.rows == 12
    assert {n: e.rows.tolist() for n, e in direc.edits.items()} == {n: e.rows.tolist() for n, e in paper.edits.items()}
    pd = next(iter(paper.edits.values())).direction
    rd = next(iter(direc.edits.values())).direction
    assert not np.array_equal(pd, rd)
    assert np.isclose(np.linalg.norm(pd), np.linalg.norm(rd), rtol=1e-5)


def test_refuses_probe_of_another_model(copy_ckpt, ckpts):
    base = copy_ckpt("bf16", False)
    other = make_probe(Checkpoint(base))
    other.model_fingerprint = "0" * 64
    with pytest.raises(ProbeError, match="another model"):
        compute_patch(base, other, top_k=3)
    wrong_size = Probe(weight=torch.randn(2, 7), bias=torch.zeros(2))
    with pytest.raises(ProbeError, match="features"):
        compute_patch(base, wrong_size, top_k=3)
    compute_patch(base, other, top_k=3, check_model=False)  # --any-probe


def test_unsupported_architecture_and_bad_target(copy_ckpt):
    base = copy_ckpt("bf16", False)
    cfg = json.loads((base / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (base / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="not supported yet"):
        resolve_targets(Checkpoint(base))
    with pytest.raises(UnsupportedError, match="matches"):
        resolve_targets(Checkpoint(base), target=r"nothing\.here")
    t = resolve_targets(Checkpoint(base), target=r"layers\.(?P<layer>\d+)\.mlp\.up_proj\.weight")
    assert t.family == "custom" and len(t.names) == 3


def test_cli_compute_json_and_errors(copy_ckpt, tmp_path):
    base = copy_ckpt("bf16", False)
    probe_path = save_probe(make_probe(Checkpoint(base)), tmp_path / "p.safetensors")
    out = tmp_path / "patch.safetensors"
    r = CliRunner().invoke(cli, ["compute", str(base), "--probe", str(probe_path), "-o", str(out), "--top-k", "5", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["rows"] == 5 and data["bytes"] == out.stat().st_size and isinstance(data["tensors"], list)
    r = CliRunner().invoke(cli, ["compute", str(base), "--probe", str(tmp_path / "missing"), "-o", str(tmp_path / "x")])
    assert r.exit_code != 0 and "Traceback" not in r.output and "missing" in r.output
    r = CliRunner().invoke(cli, ["compute", str(base), "--probe", str(probe_path), "-o", str(out), "--top-k", "5"])
    assert r.exit_code != 0 and "already exists" in r.output


def test_cli_reference_in_readme_is_current():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "cli_reference.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_compute_path_does_not_import_torch(copy_ckpt, tmp_path):
    base = copy_ckpt("bf16", False)
    probe_path = save_probe(make_probe(Checkpoint(base)), tmp_path / "p.safetensors")
    code = (
        "import sys; from patchkit.cli import main\n"
        f"try: main(['compute', {str(base)!r}, '--probe', {str(probe_path)!r}, '-o', {str(tmp_path / 'x.safetensors')!r}, '--top-k', '4'])\n"
        "except SystemExit as e: assert e.code in (0, None), e.code\n"
        "assert 'torch' not in sys.modules, 'compute imported torch'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "x.safetensors").exists()


def test_edit_norm_ratio_averages_over_edited_rows_for_layer_matched(copy_ckpt):
    base = copy_ckpt("fp32", False)
    ck = Checkpoint(base)
    probe = make_probe(ck)
    g = torch.Generator().manual_seed(5)
    probe.layer_probes = {i: (torch.randn(2, 32, generator=g) * (i + 1), torch.zeros(2)) for i in range(3)}
    patch = compute_patch(base, probe, top_k=20, alpha=0.5, strategy="layer-matched")
    tensors = load_all(base)
    n = sum(e.n_rows for e in patch.edits.values())
    dnorm = sum(e.n_rows * np.linalg.norm(e.direction) for e in patch.edits.values()) / n
    rnorm = sum(np.linalg.norm(tensors[name][e.rows].double().numpy(), axis=1).sum() for name, e in patch.edits.items()) / n
    assert len({round(float(np.linalg.norm(e.direction)), 3) for e in patch.edits.values()}) > 1  # really per-layer
    assert patch.provenance["params"]["edit_norm_ratio"] == pytest.approx(0.5 * dnorm / rnorm, rel=1e-6)


def test_cli_compute_damping_matches_the_library_and_damps_up_proj_rows(copy_ckpt, tmp_path):
    """`compute --method damping --data D --fraction F` writes damping_patch(checkpoint, data=D, fraction=F)."""
    from patchkit.core.patchfile import Patch
    from patchkit.method.damping import damping_patch
    from patchkit.method.pipeline import load_data

    base = copy_ckpt("bf16", False)
    data = tmp_path / "d.jsonl"
    bad = [f"{a} {b}" for a in ("hate", "cruel", "awful", "hurt") for b in ("people", "the group", "dogs")]
    good = [f"{a} {b}" for a in ("love", "kind", "nice", "help") for b in ("people", "the group", "dogs")]
    data.write_text("".join(json.dumps({"text": t, "label": int(t in bad)}) + "\n" for t in bad + good))
    out = tmp_path / "damp.safetensors"
    run = CliRunner()
    r = run.invoke(cli, ["compute", str(base), "--method", "damping", "--data", str(data), "--fraction", "0.25", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    patch = Patch.load(out)
    assert patch.id == got["id"] and patch.provenance["method"] == "damping" and patch.provenance["params"]["fraction"] == 0.25
    assert patch.id == damping_patch(base, data=load_data(str(data)), fraction=0.25).id  # the command adds nothing of its own
    assert set(patch.edits) and all(n.endswith("mlp.up_proj.weight") and e.encoding == "scale" for n, e in patch.edits.items())
    total = sum(Checkpoint(base).info(n).n_rows for n in Checkpoint(base).tensors if n.endswith("mlp.up_proj.weight"))
    assert 0 < patch.rows <= round(0.25 * total)
    assert sum(got["neurons"].values()) == patch.rows
    # usage errors: one line, exit 2, nothing written; an existing output is kept
    r = run.invoke(cli, ["compute", str(base), "--method", "damping", "-o", str(tmp_path / "x.safetensors")])
    assert r.exit_code == 2 and "--method damping needs --data" in r.output and not (tmp_path / "x.safetensors").exists()
    before = out.read_bytes()
    r = run.invoke(cli, ["compute", str(base), "--method", "damping", "--data", str(data), "-o", str(out)])
    assert r.exit_code == 7 and f"output {out} already exists" in r.output and out.read_bytes() == before
