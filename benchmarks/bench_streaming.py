"""`qkvlab inspect` on whole LLM checkpoints: wall time and peak RSS at the 1B and 7B shapes.

    .venv/bin/python benchmarks/bench_streaming.py [--sizes 1b,7b] [--repeats 3]

Writes random bf16 checkpoints once, outside the repository (``$QKVLAB_BENCH_DIR``, default
``~/.cache/qkvlab-bench``; 2.5 GB + 13.5 GB), tensor by tensor so the writer never holds a shard:

- LLaMA-3.2-1B shape (16 layers, d = 2048, 32 heads, 8 KV heads, d_head = 64), in 700 MB shards;
- LLaMA-2-7B shape (32 layers, d = 4096, 32 heads, d_head = 128), in LLaMA-2-7B's real layout of
  two large shards (9.98 GB + 3.50 GB).

Every figure is one thread (``OMP_NUM_THREADS=1``), a fresh process, the median of the repeats:

- qkvlab: ``qkvlab inspect DIR --quiet --json OUT`` (bf16 weights: the Gram route, ``--spectrum-method auto``);
- qkvlab with ``--spectrum-method qr`` (Householder QR, what every checkpoint got before), and the largest
  |σᵢ(gram) − σᵢ(qr)|/σ₁ over every head of the two JSON files;
- reference: a minimal streaming script that reads only the attention tensors, one layer at a time
  (safetensors' own memory-mapped reader, opened per layer), and does the same factored QR per head;
- peer (1B only): ``AutoModelForCausalLM.from_pretrained(DIR, dtype="auto")`` + ``qkvlab.inspect``,
  what a user would otherwise do (at 7B it needs the whole 13.5 GB in memory);
- the floors: one read of the attention tensors (timed with ``pread`` in the same run), plus the
  factor work at the rate batched float64 ``torch.linalg.qr(mode="r")`` (QR route) or float64 Gram
  matrix + ``cholesky_ex`` (Gram route) reaches on the same shapes in the same run, plus interpreter
  start-up with the same imports.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, write_section

BENCH_DIR = Path(os.environ.get("QKVLAB_BENCH_DIR", Path.home() / ".cache" / "qkvlab-bench"))

SHAPES = {
    "1b": {
        "label": "LLaMA-3.2-1B",
        "config": {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 64,
            "vocab_size": 128256,
            "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "tie_word_embeddings": True,
            "torch_dtype": "bfloat16",
            "hidden_act": "silu",
        },
        "shards": "700 MB each",
        "shard_limit": lambda index: 700 * 2**20,  # every shard up to this size
    },
    "7b": {
        "label": "LLaMA-2-7B",
        "config": {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "head_dim": 128,
            "vocab_size": 32000,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "hidden_act": "silu",
        },
        "shards": "two, 9.98 GB + 3.50 GB, as LLaMA-2-7B-hf",
        # the first shard's size in the real checkpoint, then everything else in the second
        "shard_limit": lambda index: 9_976_576_152 if index == 0 else None,
    },
}
# a self-check of this script in seconds (`--sizes tiny`); it writes nothing to BENCHMARKS.md
SHAPES["tiny"] = {
    "label": "tiny",
    "config": {
        **SHAPES["1b"]["config"],
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
    },
    "shards": "1 MB each",
    "shard_limit": lambda index: 2**20,
}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def _shapes(c: dict) -> dict[str, tuple[int, ...]]:
    d, f, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["head_dim"]
    q = c["num_attention_heads"] * c["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c["vocab_size"], d)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, q),
            p + "post_attention_layernorm.weight": (d,),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
        }
    shapes["model.norm.weight"] = (d,)
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (c["vocab_size"], d)
    return shapes


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    if any(a in name for a in ATTENTION):  # what inspect reads: random, so the spectra are real work
        return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    return torch.full(shape, 0.01, dtype=torch.bfloat16)  # never read by inspect; cheap to write


def _write_shard(path: Path, names: list[str], shapes: dict, gen: torch.Generator) -> None:
    """A safetensors file written one tensor at a time (the format: u64 header length, JSON, data)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        size = 2 * _numel(shapes[name])
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob)
        for name in names:
            fh.write(_tensor(name, shapes[name], gen).view(torch.uint8).numpy().tobytes())
    tmp.rename(path)


def write_checkpoint(size: str) -> Path:
    spec = SHAPES[size]
    folder = BENCH_DIR / f"{spec['label'].lower()}-shape"
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    shapes = _shapes(spec["config"])
    groups: list[list[str]] = [[]]
    used = 0
    for name, shape in shapes.items():
        limit = spec["shard_limit"](len(groups) - 1)
        if limit is not None and groups[-1] and used + 2 * _numel(shape) > limit:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += 2 * _numel(shape)
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        _write_shard(folder / file, names, shapes, gen)
        weight_map.update(dict.fromkeys(names, file))
        print(f"wrote {folder / file}", flush=True)
    total = sum(2 * _numel(s) for s in shapes.values())
    (folder / "config.json").write_text(json.dumps(spec["config"], indent=1))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return folder


_MEASURE = """
import resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.run(sys.argv[1:]).returncode
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)
"""
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def measure(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of ``cmd`` in a fresh single-threaded process."""
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, check=True, env=ENV
    )
    wall, rss_kib, rc = out.stdout.split()[-3:]
    if rc != "0":
        raise RuntimeError(f"{cmd} failed:\n{out.stderr}")
    return float(wall), int(rss_kib) / 2**20


# The minimal streaming reference: attention tensors only, one layer at a time, same factored QR.
REFERENCE = """
import json, sys
from pathlib import Path
import torch
from safetensors import safe_open
folder = Path(sys.argv[1])
config = json.loads((folder / "config.json").read_text())
where = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
h, g, dh = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
out = []
for i in range(config["num_hidden_layers"]):
    names = [f"model.layers.{i}.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    w = {}
    for name in names:
        with safe_open(str(folder / where[name]), framework="pt") as f:
            w[name[-13:-7]] = f.get_tensor(name)
    heads = lambda m, n: m.reshape(n, dh, m.shape[1]).transpose(1, 2).to(torch.float64)
    rq, rk = torch.linalg.qr(heads(w["q_proj"], h), mode="r").R, torch.linalg.qr(heads(w["k_proj"], g), mode="r").R
    rv = torch.linalg.qr(heads(w["v_proj"], g), mode="r").R
    p = w["o_proj"].reshape(-1, h, dh).permute(1, 0, 2).to(torch.float64)
    rp = torch.linalg.qr(p, mode="r").R
    group = torch.arange(h) // (h // g)
    qk = torch.linalg.svdvals(rk[group] @ rq.transpose(-1, -2))
    ov = torch.linalg.svdvals(rp @ rv[group].transpose(-1, -2))
    out.append((qk.sum().item(), ov.sum().item()))
print(len(out))
"""

# One read of the attention tensors' bytes, as qkvlab reads them (pread), nothing else.
READ = """
import json, os, struct, sys, time
from pathlib import Path
folder = Path(sys.argv[1])
where = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
headers = {}
for file in set(where.values()):
    with open(folder / file, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        headers[file] = (json.loads(fh.read(n)), 8 + n)
t, total = time.perf_counter(), 0
for name, file in where.items():
    if "self_attn" not in name:
        continue
    header, start = headers[file]
    a, b = header[name]["data_offsets"]
    fd = os.open(folder / file, os.O_RDONLY)
    buf = bytearray(b - a)
    done = 0
    while done < b - a:
        done += os.preadv(fd, [memoryview(buf)[done:]], start + a + done)
    os.close(fd)
    total += b - a
print(time.perf_counter() - t, total)
"""

# The factor work on one layer's shapes, per-head factors laid out as qkvlab lays them (bf16 → float64
# included), one thread: batched torch.linalg.qr(mode="r") (argv[6] == "qr") or the float64 Gram
# matrix and cholesky_ex ("gram").
QR = """
import statistics, sys, time
import torch
torch.set_num_threads(1)
d, q, kv, dh, layers = (int(x) for x in sys.argv[1:6])
route = sys.argv[6]
w = {n: (torch.randn(rows, d) * 0.02).to(torch.bfloat16) for n, rows in (("q", q), ("k", kv), ("v", kv))}
o = (torch.randn(d, q) * 0.02).to(torch.bfloat16)
def r_of(x):
    x = x.to(torch.float64)
    if route == "qr":
        return torch.linalg.qr(x, mode="r")
    return torch.linalg.cholesky_ex(x.transpose(-1, -2) @ x, upper=True)
def layer():
    for m in w.values():
        r_of(m.reshape(-1, dh, d).transpose(1, 2))
    r_of(o.reshape(d, -1, dh).permute(1, 0, 2))
layer()
times = []
for _ in range(3):
    t = time.perf_counter(); layer(); times.append(time.perf_counter() - t)
print(statistics.median(times) * layers)
"""


def run(size: str, repeats: int) -> dict:
    spec = SHAPES[size]
    c = spec["config"]
    folder = write_checkpoint(size)
    out_json, qr_json = BENCH_DIR / f"inspect-{size}.json", BENCH_DIR / f"inspect-{size}-qr.json"
    ours = [sys.executable, "-m", "qkvlab", "inspect", str(folder), "--quiet", "--json", str(out_json)]
    ours_qr = [*ours[:-1], str(qr_json), "--spectrum-method", "qr"]
    reference = [sys.executable, "-c", REFERENCE, str(folder)]
    peer = [sys.executable, "-c", PEER, str(folder)]
    measure(ours)  # warm the page cache: the warm figures are the repeatable ones
    rows: dict[str, list[tuple[float, float]]] = {"ours": [], "ours_qr": [], "reference": [], "peer": []}
    for _ in range(repeats):
        rows["ours"].append(measure(ours))
        rows["ours_qr"].append(measure(ours_qr))
        rows["reference"].append(measure(reference))
        if size == "1b":
            rows["peer"].append(measure(peer))
    read = statistics.median(
        float(
            subprocess.run(
                [sys.executable, "-c", READ, str(folder)], capture_output=True, text=True, check=True, env=ENV
            ).stdout.split()[0]
        )
        for _ in range(repeats)
    )
    attention_bytes = int(
        subprocess.run(
            [sys.executable, "-c", READ, str(folder)], capture_output=True, text=True, check=True, env=ENV
        ).stdout.split()[1]
    )
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    qr_args = [str(x) for x in (c["hidden_size"], q, kv, c["head_dim"], c["num_hidden_layers"])]
    qr, gram = (
        statistics.median(
            float(
                subprocess.run(
                    [sys.executable, "-c", QR, *qr_args, route],
                    capture_output=True,
                    text=True,
                    check=True,
                    env=ENV,
                ).stdout.split()[0]
            )
            for _ in range(repeats)
        )
        for route in ("qr", "gram")
    )
    startup = statistics.median(
        measure([sys.executable, "-c", "import qkvlab.cli, qkvlab.inspection, torch"])[0]
        for _ in range(repeats)
    )
    med = {
        k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
        for k, v in rows.items()
        if v
    }
    files = sorted(folder.glob("*.safetensors"))
    return {
        "size": size,
        "label": spec["label"],
        "shards": f"{len(files)} ({', '.join(f'{f.stat().st_size / 1e9:.2f}' for f in files)} GB)",
        "total_gb": sum(f.stat().st_size for f in files) / 1e9,
        "attention_gb": attention_bytes / 1e9,
        "med": med,
        "read": read,
        "qr": qr,
        "gram": gram,
        "startup": startup,
        "floor": read + gram + startup,
        "floor_qr": read + qr + startup,
        "methods": json.loads(out_json.read_text())["precision"]["method"],
        "bound": json.loads(out_json.read_text())["precision"]["relative_error_bound"],
        "error": _largest_difference(out_json, qr_json),
    }


def _largest_difference(a: Path, b: Path) -> float:
    """max over every head of max_i |σᵢ(a) − σᵢ(b)| / σ₁(b)."""
    worst = 0.0
    for x, y in zip(json.loads(a.read_text())["heads"], json.loads(b.read_text())["heads"], strict=True):
        top = y["singular_values"][0]
        worst = max(
            worst,
            max(abs(p - q) for p, q in zip(x["singular_values"], y["singular_values"], strict=True)) / top,
        )
    return worst


PEER = """
import sys, qkvlab
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="auto")
qkvlab.inspect(model)
"""


def render(results: list[dict], repeats: int) -> str:
    lines = [
        "## 3. `inspect` at LLM scale: whole checkpoints, streamed",
        "",
        f"Machine: {machine()}.",
        "Command: `.venv/bin/python benchmarks/bench_streaming.py` (writes random bf16 checkpoints once to "
        "`$QKVLAB_BENCH_DIR`, default `~/.cache/qkvlab-bench`, outside the repository).",
        f"Every figure: one thread (`OMP_NUM_THREADS=1`), a fresh process, median of {repeats}, page cache warm. "
        "Peak RSS is the process's maximum resident set (Python, torch and whatever the reader keeps resident).",
        "",
        "| checkpoint | what | wall (s) | peak RSS (GiB) | ÷ baseline (time) |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        name = f"{r['label']} shape, {r['total_gb']:.1f} GB, {r['shards']} shards"
        ours_t, ours_m = r["med"]["ours"]
        lines.append(
            f"| {name} | **qkvlab `inspect DIR --json`** (Gram route) | **{ours_t:.2f}** | **{ours_m:.2f}** | "
            f"**{ours_t / r['floor']:.2f}×** |"
        )
        qr_t, qr_m = r["med"]["ours_qr"]
        lines.append(
            f"| | qkvlab `inspect DIR --json --spectrum-method qr` | {qr_t:.2f} | {qr_m:.2f} | "
            f"{qr_t / r['floor_qr']:.2f}× of its baseline |"
        )
        ref_t, ref_m = r["med"]["reference"]
        lines.append(
            f"| | minimal streaming reference (attention only, per layer) | {ref_t:.2f} | {ref_m:.2f} | "
            f"{ref_t / r['floor']:.2f}× |"
        )
        if "peer" in r["med"]:
            peer_t, peer_m = r["med"]["peer"]
            lines.append(
                f'| | peer: `from_pretrained(dtype="auto")` + `qkvlab.inspect(model)` | {peer_t:.2f} | '
                f"{peer_m:.2f} | {peer_t / r['floor']:.2f}× |"
            )
        lines.append(
            f"| | baseline: read {r['attention_gb']:.2f} GB of attention ({r['read']:.2f} s) + batched Gram + "
            f"Cholesky ({r['gram']:.2f} s) + start-up ({r['startup']:.2f} s) | {r['floor']:.2f} | — | 1.00× |"
        )
        lines.append(
            f"| | baseline of the QR route: the same with batched QR ({r['qr']:.2f} s) | {r['floor_qr']:.2f} | — | "
            f"{r['floor_qr'] / r['floor']:.2f}× |"
        )
    lines += [
        "",
        "Accuracy of the Gram route (bf16 weights): the largest |σᵢ(gram) − σᵢ(qr)|/σ₁ over every head and "
        "singular value is "
        + "; ".join(f"{r['error']:.1e} at the {r['label']} shape" for r in results)
        + " (target ≤ 1e-5), on random Gaussian weights, which are well conditioned: the Gram route's easy "
        "case, its error growing with the square of the factors' condition number. The worst-case bound it "
        "states in its JSON, what holds for any weights, is "
        + "; ".join(f"{r['bound']:.1e}" for r in results)
        + " of σ₁: a guarantee, far above what it does and above the 1e-5 target, so the target is met by "
        'measurement, not by the guarantee (docs/spectra.md, "Precision").',
        "",
        "Time: "
        + "; ".join(
            f"{r['label']}: the Gram route takes {r['med']['ours'][0] / r['med']['ours_qr'][0]:.2f}× the QR "
            f"route's time at {r['med']['ours'][1] / r['med']['ours_qr'][1]:.2f}× its memory"
            for r in results
        )
        + ".",
        "",
        "Ratios: "
        + "; ".join(
            f"{r['label']}: qkvlab is {r['med']['reference'][0] / r['med']['ours'][0]:.2f}× the reference's speed "
            f"at {r['med']['ours'][1] / r['med']['reference'][1]:.2f}× its memory (like for like, its QR route "
            f"is {r['med']['reference'][0] / r['med']['ours_qr'][0]:.2f}× the reference's speed)"
            + (
                f", {r['med']['peer'][0] / r['med']['ours'][0]:.1f}× the peer's speed at "
                f"{r['med']['ours'][1] / r['med']['peer'][1]:.2f}× its memory"
                if "peer" in r["med"]
                else ""
            )
            for r in results
        )
        + ". The reference takes the QR route, so what qkvlab gains over it comes from the Gram route, not "
        "from streaming; qkvlab's QR route also pays its own imports, the group products and the JSON.",
        "",
        "Targets: issue 14, peak RSS ≤ 1 GiB at the 7B shape, whatever the shard layout, and time ≤ 1.3× the "
        "baseline; issue 32, ≤ 0.6× of the 51.92 s the QR route took on 2026-11-25, at the same memory, with every "
        "σᵢ within 1e-5·σ₁ of float64 QR's. That 51.92 s was measured on another processor (AMD EPYC, 2 cores), "
        "so the comparable figure is the ratio of the two routes measured here in the same run. "
        "LLaMA-3.2-1B has grouped-query attention: qkvlab also computes its 8 group products per layer "
        "(docs/spectra.md), which the baselines and the reference leave out. "
        "The baselines are measured implementations of the necessary work, not physical limits, and are "
        "measured in the same run: one `pread` of exactly the attention tensors' bytes; "
        'batched float64 Gram matrices + `cholesky_ex`, or batched `torch.linalg.qr(mode="r")`, on one layer\'s '
        "per-head factors (bf16 converted first, as qkvlab does) × the layer count; and "
        '`python -c "import qkvlab.cli, qkvlab.inspection, torch"`. They overstate the limit in two ways: the '
        "start-up is qkvlab's own import time, and each Gram matrix is a full matrix product where the symmetric "
        "product needs half its flops; the limit for the bytes alone is the `pread` time. "
        "The core SVDs (d_head × d_head per head) and the JSON are the rest. The peer is not run at 7B: "
        "loading the whole 13.5 GB model is what streaming avoids. Absolute times on a shared 2-core virtual machine are noisy; "
        "the ratios within one run are the figures to trust.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1b,7b")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = [run(size, args.repeats) for size in args.sizes.split(",")]
    body = render(results, args.repeats)
    print(body)
    if "tiny" not in args.sizes:
        write_section("streaming", body)


if __name__ == "__main__":
    main()
