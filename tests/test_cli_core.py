"""The core commands' output: --json prints one object with the documented keys; inspect and
status stay free of torch."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import build_patch, run_cli_subprocess
from patchkit.core import ops
from patchkit.core.patchfile import Patch
from patchkit.core.stfile import serialize


def one_json_object(r) -> dict:
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout
    obj = json.loads(lines[0])
    assert isinstance(obj, dict)
    return obj


def test_inspect_json(ckpts, make_patch, cli_runner):
    base = ckpts[("bf16", True)]
    path = make_patch(base)
    p = Patch.load(path)
    s = one_json_object(cli_runner("inspect", path, "--json"))
    assert s["id"] == p.id
    assert s["format"] == "patchkit.patch v1"
    assert isinstance(s["rows"], int) and s["rows"] == p.rows == 16
    assert isinstance(s["tensors"], list)
    assert sorted((t["name"], t["rows"]) for t in s["tensors"]) == sorted((n, e.n_rows) for n, e in p.edits.items())
    assert s["bytes"] == path.stat().st_size
    human = cli_runner("inspect", path)
    assert human.exit_code == 0 and p.id in human.output and "lm_head.weight" in human.output


def test_inspect_json_stays_clean_with_a_warning(ckpts, tmp_path, cli_runner):
    p = build_patch(ckpts[("bf16", False)])
    meta = p._metadata()
    meta["x-later"] = "1"
    arrays = p._arrays()
    meta["id"] = hashlib.sha256(serialize(arrays, meta)).hexdigest()
    (tmp_path / "w.safetensors").write_bytes(serialize(arrays, meta))
    r = cli_runner("inspect", tmp_path / "w.safetensors", "--json")
    s = one_json_object(r)
    assert s["id"] == meta["id"]
    assert "warning:" in r.stderr and "x-later" in r.stderr


def test_apply_revert_status_json(copy_ckpt, make_patch, tmp_path, cli_runner):
    ck = copy_ckpt("fp16", True)
    p1 = make_patch(ck, seed=1, tensors=("model.layers.0.mlp.gate_proj.weight",), name="p1.safetensors")
    p2 = make_patch(ck, seed=2, tensors=("lm_head.weight",), name="p2.safetensors")
    ids = [Patch.load(p1).id, Patch.load(p2).id]

    a = one_json_object(cli_runner("apply", p1, p2, ck, "-o", tmp_path / "out", "--json"))
    assert a["output"] == str(tmp_path / "out")
    assert a["applied"] == ids
    assert isinstance(a["rows"], int) and a["rows"] == 10

    a = one_json_object(cli_runner("apply", p1, ck, "--in-place", "--json"))
    assert a["output"] == str(ck) and a["applied"] == ids[:1] and a["rows"] == 5

    s = one_json_object(cli_runner("status", tmp_path / "out", "--json"))
    assert isinstance(s["applied"], list) and [x["id"] for x in s["applied"]] == ids
    assert all(isinstance(x, dict) and x["intact"] is True for x in s["applied"])

    r = one_json_object(cli_runner("revert", p2, tmp_path / "out", "--in-place", "--json"))
    assert r["reverted"] == ids[1:] and r["rows"] == 5 and r["exact"] is True

    s = one_json_object(cli_runner("status", tmp_path / "out", "--json"))
    assert [x["id"] for x in s["applied"]] == ids[:1]

    s = one_json_object(cli_runner("status", copy_ckpt("fp16", True), "--json"))
    assert s["applied"] == []


def test_diff_json(ckpts, make_patch, tmp_path, cli_runner):
    base = ckpts[("bf16", False)]
    path = make_patch(base)
    ops.apply(path, base, tmp_path / "edited")
    d = one_json_object(cli_runner("diff", base, tmp_path / "edited", "-o", tmp_path / "d.safetensors", "--json",
                                   "--max-changed", "1"))
    q = Patch.load(tmp_path / "d.safetensors")
    assert d["id"] == q.id
    assert isinstance(d["rows"], int) and d["rows"] == q.rows == Patch.load(path).rows


def test_version(cli_runner):
    r = cli_runner("--version")
    assert r.exit_code == 0 and "0.1.0" in r.output


NO_TORCH = """
import sys
from patchkit.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    assert e.code in (0, None), e.code
bad = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.") or m == "transformers")
assert not bad, bad
print("NO-TORCH-OK", file=sys.stderr)
"""


def _no_torch(args):
    r = subprocess.run([sys.executable, "-c", NO_TORCH, *map(str, args)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "NO-TORCH-OK" in r.stderr
    return r


@pytest.mark.parametrize("as_json", [False, True])
def test_inspect_does_not_import_torch(ckpts, make_patch, as_json):
    path = make_patch(ckpts[("bf16", False)])
    r = _no_torch(["inspect", path] + (["--json"] if as_json else []))
    assert Patch.load(path).id in r.stdout


def test_status_does_not_import_torch(ckpts, make_patch, tmp_path):
    base = ckpts[("bf16", True)]
    path = make_patch(base)
    ck = tmp_path / "ck"
    shutil.copytree(base, ck)
    ops.apply(path, ck, in_place=True)
    r = _no_torch(["status", ck, "--json"])
    assert json.loads(r.stdout)["applied"][0]["id"] == Patch.load(path).id
    # also when status has to roll back an interrupted write
    r = run_cli_subprocess(["revert", path, ck, "--in-place"], {"PATCHKIT_CRASH_AT": "after-write"})
    assert r.returncode == -9
    r = _no_torch(["status", ck])
    assert "recovered" in r.stdout


def test_import_patchkit_does_not_import_torch():
    code = "import sys, patchkit, patchkit.core.patchfile, patchkit.core.ops, patchkit.core.diff; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


# ---- the console script's quick exit ---------------------------------------------------------------
def _run_entry(code: str, tmp_path, *args):
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)


def test_console_entry_exit_codes_and_output(ckpts, make_patch, tmp_path):
    ck = ckpts[("bf16", False)]
    path = make_patch(ck)
    r = subprocess.run([sys.executable, "-m", "patchkit", "inspect", path, "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout)["id"] == Patch.load(path).id  # the whole object, flushed
    r = subprocess.run([sys.executable, "-m", "patchkit", "inspect", tmp_path / "missing.safetensors"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([sys.executable, "-m", "patchkit", "--no-such-option"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "No such option" in r.stderr


def test_console_entry_runs_exit_handlers_and_waits_for_threads(tmp_path):
    code = (
        "import atexit, sys, threading, time, pathlib\n"
        "atexit.register(lambda: pathlib.Path('atexit-ran').write_text('yes'))\n"
        "def late():\n"
        "    time.sleep(0.3); pathlib.Path('thread-finished').write_text('yes')\n"
        "threading.Thread(target=late).start()\n"
        "sys.argv = ['patchkit', '--version']\n"
        "from patchkit.cli import run\n"
        "run()\n"
    )
    r = _run_entry(code, tmp_path)
    assert r.returncode == 0 and "0.1.0" in r.stdout
    assert (tmp_path / "atexit-ran").read_text() == "yes"
    assert (tmp_path / "thread-finished").read_text() == "yes"  # not cut short by the quick exit


@pytest.mark.parametrize(("args", "preset", "expected"), [
    (["apply", "--help"], None, "1"),  # numpy-only commands keep OpenBLAS's spinning threads away
    (["status", "--help"], None, "1"),
    (["compute", "--help"], None, "None"),  # scoring rows uses BLAS: left as it is
    (["apply", "--help"], "4", "4"),  # what the user set is kept
])
def test_console_entry_keeps_openblas_off_the_cores_for_numpy_only_commands(tmp_path, args, preset, expected):
    code = (
        "import atexit, os, sys\n"
        "atexit.register(lambda: print('OPENBLAS', os.environ.get('OPENBLAS_NUM_THREADS')))\n"
        f"sys.argv = ['patchkit', *{args!r}]\n"
        "from patchkit.cli import run\n"
        "run()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if preset is not None:
        env["OPENBLAS_NUM_THREADS"] = preset
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"OPENBLAS {expected}" in r.stdout.splitlines()


def test_one_output_exists_check_for_every_writer(tmp_path, copy_ckpt, cli_runner):
    from patchkit.errors import OutputExistsError

    taken = tmp_path / "taken"
    taken.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError) as e:
        OutputExistsError.check(taken)
    assert e.value.path == taken and e.value.exit_code == 7
    assert str(e.value) == f"output {taken} already exists (use --overwrite to replace it)"
    OutputExistsError.check(taken, overwrite=True)
    OutputExistsError.check(tmp_path / "free")
    base = copy_ckpt("bf16", True)
    p = build_patch(base, seed=3).save(tmp_path / "p.safetensors")
    for args in (["merge", p, "-o", taken], ["export", p, "--to", "peft", "-o", taken], ["diff", base, base, "-o", taken],
                 ["probe", base, "--data", "builtin:toxicity", "-o", taken], ["compute", base, "--probe", p, "-o", taken],
                 ["tune", base, "--probe", p, "-o", taken, "--max-kl", "0.1"]):
        r = cli_runner(*args)
        assert r.exit_code == 7 and f"output {taken} already exists (use --overwrite to replace it)" in r.output, (args, r.output)
    assert taken.read_bytes() == b"keep me"
