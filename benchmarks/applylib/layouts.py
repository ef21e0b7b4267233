"""The checkpoints the apply benchmark measures, and the patches it applies to them.

The single-size mode uses the TinyLlama-1.1B layout (``CONFIG``), generated once with torch in ~1 GB
shards and cached in the work folder (``generate_checkpoint``, ``base_is_cached``). The scale curve
(``LAYOUTS``: SmolLM2-135M, TinyLlama-1.1B, LLaMA-2-7B) streams random bf16 weights straight into
the safetensors layout, in shards of at most 5 GB as save_pretrained writes them (``write_layout``),
and builds each size's paper-sized patch (``curve_patch``) and a probe for ``patchkit compute``
(``curve_probe``). Nothing here times anything.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from applylib.measure import rmtree, weight_files

# ---- the model ----------------------------------------------------------------------------------
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
    "use_cache": True,
}
SHARD_BYTES = 1 << 30  # ~1 GB shards -> 3 shards for 2.2 GB
SEED = 0
PATCH_FRACTION = 0.0465
ALPHA = 1.08
GEN_VERSION = 2  # bump to invalidate cached checkpoints


def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) in the order LlamaForCausalLM's state dict lists them."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    specs = [("model.embed_tokens.weight", (v, h), "normal")]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [
            (p + "self_attn.q_proj.weight", (h, h), "normal"),
            (p + "self_attn.k_proj.weight", (kv, h), "normal"),
            (p + "self_attn.v_proj.weight", (kv, h), "normal"),
            (p + "self_attn.o_proj.weight", (h, h), "normal"),
            (p + "mlp.gate_proj.weight", (inter, h), "normal"),
            (p + "mlp.up_proj.weight", (inter, h), "normal"),
            (p + "mlp.down_proj.weight", (h, inter), "normal"),
            (p + "input_layernorm.weight", (h,), "ones"),
            (p + "post_attention_layernorm.weight", (h,), "ones"),
        ]
    specs += [("model.norm.weight", (h,), "ones"), ("lm_head.weight", (v, h), "normal")]
    return specs


def gate_names(cfg: dict) -> list[str]:
    return [f"model.layers.{i}.mlp.gate_proj.weight" for i in range(cfg["num_hidden_layers"])]


def nbytes(shape) -> int:
    return int(np.prod(shape)) * 2  # bf16


def split_shards(specs: list[tuple[str, tuple[int, ...], str]], limit: int) -> list[list[tuple[str, tuple[int, ...], str]]]:
    """The tensors in order, cut into shards of at most `limit` bytes (a larger tensor alone)."""
    shards: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
    size = 0
    for spec in specs:
        nb = nbytes(spec[1])
        if shards[-1] and size + nb > limit:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nb
    return shards


def generate_checkpoint(path: Path, log) -> None:
    """Write the random bf16 checkpoint shard by shard: at most one shard's tensors in memory."""
    import torch
    from safetensors.torch import save_file

    shards = split_shards(tensor_specs(CONFIG), SHARD_BYTES)
    n = len(shards)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    gen = torch.Generator().manual_seed(SEED)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for name, shape, init in shard:
            if init == "ones":
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02).to(torch.bfloat16)
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * 2
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
        log(f"  wrote {fname} ({(tmp / fname).stat().st_size / 1e9:.2f} GB)")
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    (tmp / "BENCHMARK_BASE.json").write_text(json.dumps({"gen_version": GEN_VERSION, "seed": SEED, "bytes": total}) + "\n")
    # look like a downloaded checkpoint: mkdtemp makes 0700 and safetensors writes 0600
    os.chmod(tmp, 0o755)
    for p in tmp.iterdir():
        os.chmod(p, 0o644)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def base_is_cached(path: Path) -> bool:
    marker = path / "BENCHMARK_BASE.json"
    try:
        return json.loads(marker.read_text()).get("gen_version") == GEN_VERSION
    except (OSError, ValueError):
        return False


# ---- the scale curve's layouts: streamed, no torch ---------------------------------------------------
def llama_config(hidden, inter, layers, heads, kv, vocab, tied, max_pos, rope):
    return {**CONFIG, "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
            "tie_word_embeddings": tied, "max_position_embeddings": max_pos, "rope_theta": rope}


LAYOUTS = {  # name -> (layout, config, K: rows edited; None = int(4.65% of the gate_proj rows))
    "135m": ("SmolLM2-135M", llama_config(576, 1536, 30, 9, 3, 49152, True, 8192, 100000.0), None),
    "1.1b": ("TinyLlama-1.1B", CONFIG, None),
    "7b": ("LLaMA-2-7B", llama_config(4096, 11008, 32, 32, 32, 32000, False, 4096, 10000.0), 16384),  # of 352,256
}
SAVE_SHARD_BYTES = 5 * 10**9  # save_pretrained's "5GB" shards


def curve_specs(cfg: dict) -> list[tuple[str, tuple[int, ...], str]]:
    specs = tensor_specs(cfg)
    return [s for s in specs if not (cfg["tie_word_embeddings"] and s[0] == "lm_head.weight")]


def random_bf16(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random finite bf16 values (as uint16 bits): random sign and mantissa, magnitudes 2^-11..2^-7.
    Fast (random bytes and two integer operations), and no two rows alike, so no top-K ties."""
    r = np.frombuffer(rng.bytes(2 * n), dtype=np.uint16).copy()
    r &= np.uint16(0x81FF)
    r |= np.uint16(0x3A00)
    return r


def write_layout(path: Path, cfg: dict, log) -> int:
    """The random bf16 checkpoint, streamed tensor by tensor into shards of at most 5 GB (one file,
    model.safetensors, when it fits in one), as save_pretrained lays them out. One tensor in memory.
    gate_proj tensors are random throughout; the others repeat one random 8 MB block (faster)."""
    shards = split_shards(curve_specs(cfg), SAVE_SHARD_BYTES)
    n = len(shards)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    rng = np.random.default_rng(SEED)
    block = random_bf16(np.random.default_rng(SEED + 1), 1 << 22)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        fname = "model.safetensors" if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, _ in shard:
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + nbytes(shape)]}
            off += nbytes(shape)
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with open(tmp / fname, "wb") as f:
            f.write(len(text).to_bytes(8, "little") + text)
            for name, shape, init in shard:
                count = int(np.prod(shape))
                if init == "ones":
                    f.write(memoryview(np.full(count, 0x3F80, np.uint16)))
                elif ".mlp.gate_proj." in name:  # the rows scored and edited: all different
                    f.write(memoryview(random_bf16(rng, count)))
                else:  # the rest only has to be there: one random block, written over and over
                    for start in range(0, count, len(block)):
                        f.write(memoryview(block[: min(len(block), count - start)]))
                weight_map[name] = fname
                total += count * 2
        log(f"  wrote {fname} ({(tmp / fname).stat().st_size / 1e9:.2f} GB)")
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    os.chmod(tmp, 0o755)
    rmtree(path)
    os.replace(tmp, path)
    return total


def layout_files(ckpt: Path) -> list[str]:
    idx = ckpt / "model.safetensors.index.json"
    return weight_files(ckpt) if idx.exists() else ["model.safetensors"]


def curve_patch(ckpt: Path, out: Path, cfg: dict, k: int) -> dict:
    """K gate_proj rows (seeded), one shared direction scaled by ALPHA, norm that of a base row."""
    from patchkit.core.checkpoint import Checkpoint
    from patchkit.core.dtypes import to_float
    from patchkit.core.patchfile import Patch, make_edit

    ck = Checkpoint(ckpt)
    names, per, h = gate_names(cfg), cfg["intermediate_size"], cfg["hidden_size"]
    total_rows = per * len(names)
    rng = np.random.default_rng(SEED)
    chosen = np.sort(rng.choice(total_rows, size=k, replace=False))
    sample = to_float(ck.read_rows(names[0], np.arange(16)), "BF16").reshape(16, h)
    direction = rng.standard_normal(h).astype(np.float32)
    direction *= np.float32(float(np.median(np.linalg.norm(sample, axis=1))) / np.linalg.norm(direction))
    delta_row = (np.float32(ALPHA) * direction).astype(np.float32)
    edits = {}
    for layer, name in enumerate(names):
        rows = (chosen[(chosen >= layer * per) & (chosen < (layer + 1) * per)] - layer * per).astype(np.int64)
        if len(rows):
            info = ck.info(name)
            edits[name] = make_edit(name, info.shape, info.dtype, rows, ck.read_rows(name, rows),
                                    delta=np.broadcast_to(delta_row, (len(rows), h)))
    patch = Patch(edits=edits, provenance={"method": "benchmark"})
    patch.save(out)
    return {"bytes": out.stat().st_size, "rows": int(k), "of_rows": int(total_rows), "tensors": len(edits),
            "encodings": sorted({e.encoding for e in edits.values()}), "id": patch.id}


def curve_probe(ckpt: Path, out: Path, cfg: dict) -> None:
    import torch

    from patchkit.core.checkpoint import Checkpoint
    from patchkit.method.probe import Probe, save_probe

    gen = torch.Generator().manual_seed(SEED)
    weight = torch.randn((2, cfg["hidden_size"]), generator=gen, dtype=torch.float32) * 0.02
    # train_accuracy given: its default, NaN, would end up in the patch's provenance, which Patch.load refuses
    save_probe(Probe(weight=weight, bias=torch.zeros(2), label_names=("benign", "behaviour"), train_accuracy=1.0,
                     model_fingerprint=Checkpoint(ckpt).fingerprint()), out)
