"""Frozen quantized weights on one CUDA GPU: bytes per frozen parameter, and forward + input-gradient time of
one fine-tuning-shaped layer for bf16 cuBLAS (the reference), ours (each format and compute path), and the
peers where installed (bitsandbytes Linear4bit nf4 and Linear8bitLt int8, torchao's NF4).

    python benchmarks/weights.py                                  # M=8192 tokens, K=4096 -> N=11008; ~1 minute
    python benchmarks/weights.py --tokens 2048,8192 --json out.json

Install the peers first to compare (the script runs without them and says so in the table):
    pip install bitsandbytes==0.50.2 torchao==0.18.0

Every variant runs in this one process on the same x [M, K] (bf16, requires grad), W [N, K] and dy [M, N]:
forward y = x @ W^T, then backward for dx only (W is frozen). Times are `triton.testing.do_bench` medians
(ms). "rel. error" is ||y - y_bf16|| / ||y_bf16|| against the bf16 layer (the format's quantization error
plus the kernel's rounding). "peak extra" is the largest allocation above the inputs during forward +
backward (what the layer adds at run time: our dequantize workspace, a peer's dequantized weight).

Writes benchmarks/weights_results.json by default: the rows, and `overhead_s_per_param` (ours minus bf16,
forward + input gradient, per parameter, at the largest token count) that memtune's cost model reads for a
profile of the same GPU (strategies/weights.py). A markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if "--cpu-smoke" in sys.argv:  # the kernels must see it before they are defined
    os.environ["TRITON_INTERPRET"] = "1"
from memtune.kernels import frozen_linear as FL  # noqa: E402
from memtune.kernels import nf4  # noqa: E402

PEERS = "pip install bitsandbytes==0.50.2 torchao==0.18.0"
FUSED_CONFIGS = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)]


DEV = "cuda"  # --cpu-smoke: "cpu", tiny shapes, Triton's interpreter, one timed call (checks the script only)


def bench(fn, grad_to_none=None) -> float:
    if DEV != "cuda":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"))


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def _allocated() -> int:
    return torch.cuda.memory_allocated() if DEV == "cuda" else 0


def tensors_nbytes(obj: Any, seen: set[int] | None = None, depth: int = 0) -> int:
    """Bytes of every tensor reachable through an object's attributes (quant states, tensor subclasses)."""
    seen = set() if seen is None else seen
    if depth > 4 or id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor) and type(obj) in (torch.Tensor, torch.nn.Parameter):
        return obj.numel() * obj.element_size()
    total = 0
    if isinstance(obj, torch.Tensor):  # a subclass: its inner tensors
        names = obj.__tensor_flatten__()[0] if hasattr(obj, "__tensor_flatten__") else []
        for n in names:
            total += tensors_nbytes(getattr(obj, n), seen, depth + 1)
        if not names:
            total += obj.untyped_storage().nbytes()
        for n in ("quant_state", "SCB"):
            if hasattr(obj, n):
                total += tensors_nbytes(getattr(obj, n), seen, depth + 1)
        return total
    if isinstance(obj, (list, tuple)):
        return sum(tensors_nbytes(v, seen, depth + 1) for v in obj)
    if isinstance(obj, dict):
        return sum(tensors_nbytes(v, seen, depth + 1) for v in obj.values())
    for v in getattr(obj, "__dict__", {}).values():
        if isinstance(v, (torch.Tensor, list, tuple, dict)) or hasattr(v, "__dict__") and type(v).__module__.startswith(
                ("bitsandbytes", "torchao")):
            total += tensors_nbytes(v, seen, depth + 1)
    return total


class Case:
    def __init__(self, name: str, kind: str, forward=None, stored_bytes: int | None = None, note: str = "",
                 error: str | None = None):
        self.name, self.kind, self.forward, self.stored_bytes, self.note, self.error = (
            name, kind, forward, stored_bytes, note, error)


def our_cases(w: torch.Tensor) -> tuple[list[Case], dict[str, Any]]:
    cases = []
    quantized = {}
    for fmt, dq in (("nf4", True), ("nf4", False), ("int8", True), ("bf16", True)):
        label = fmt + ("" if fmt != "nf4" else " dq" if dq else " no-dq")
        q = FL.quantize_weight(w, fmt, double_quant=dq)
        quantized[label] = q
        ws = FL.Workspace()  # one per case, so each row's peak extra shows its own workspace
        cases.append(Case(f"ours {label}, dequant + cuBLAS", "ours",
                          lambda x, q=q, ws=ws: FL.frozen_linear(x, q, workspace=ws),
                          q.nbytes, "Triton dequantize into a shared workspace, then torch.mm" if fmt != "bf16"
                          else "stored bf16 used as it is"))
        if fmt == "nf4":
            cases.append(Case(f"ours {label}, fused GEMM", "ours", lambda x, q=q: FL.frozen_linear(x, q, kernel="fused"),
                              q.nbytes, "Triton GEMM dequantizing W tiles in its K loop"))
    return cases, {"quantized": quantized}


def peer_cases(w: torch.Tensor) -> list[Case]:
    n, k = w.shape
    out: list[Case] = []
    try:
        import bitsandbytes as bnb
    except Exception as e:  # noqa: BLE001
        why = f"not importable ({type(e).__name__}: {str(e)[:80]}); {PEERS}"
        out.append(Case("bitsandbytes Linear4bit nf4", "peer", error=why))
        out.append(Case("bitsandbytes Linear8bitLt int8", "peer", error=why))
    else:
        ver = getattr(bnb, "__version__", "?")
        try:
            lin = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                                    quant_type="nf4")
            lin.weight = bnb.nn.Params4bit(w.detach().cpu(), requires_grad=False, compress_statistics=True,
                                           quant_type="nf4", blocksize=64)
            lin = lin.to(DEV)
            out.append(Case(f"bitsandbytes {ver} Linear4bit nf4", "peer", lin, tensors_nbytes(lin.weight),
                            "compress_statistics (double quant), bf16 compute"))
        except Exception as e:  # noqa: BLE001
            out.append(Case("bitsandbytes Linear4bit nf4", "peer", error=f"{type(e).__name__}: {e}"))
        try:
            lin8 = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=6.0)
            lin8.weight = bnb.nn.Int8Params(w.detach().cpu(), requires_grad=False, has_fp16_weights=False)
            lin8 = lin8.to(DEV)
            out.append(Case(f"bitsandbytes {ver} Linear8bitLt int8", "peer", lin8, tensors_nbytes(lin8.weight),
                            "has_fp16_weights=False, threshold 6.0 (LLM.int8 outliers)"))
        except Exception as e:  # noqa: BLE001
            out.append(Case("bitsandbytes Linear8bitLt int8", "peer", error=f"{type(e).__name__}: {e}"))
    try:
        import torchao

        try:
            from torchao.dtypes.nf4tensor import linear_nf4, to_nf4
        except ImportError:  # torchao >= 0.15 moved it
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4
    except Exception as e:  # noqa: BLE001
        out.append(Case("torchao NF4", "peer", error=f"not importable ({type(e).__name__}: {str(e)[:80]}); {PEERS}"))
    else:
        try:
            wq = to_nf4(w.detach(), 64, 256)
            out.append(Case(f"torchao {getattr(torchao, '__version__', '?')} NF4", "peer",
                            lambda x, wq=wq: linear_nf4(x, wq), tensors_nbytes(wq),
                            "to_nf4(block 64, scaler block 256) + linear_nf4"))
        except Exception as e:  # noqa: BLE001
            out.append(Case("torchao NF4", "peer", error=f"{type(e).__name__}: {e}"))
    return out


def run_case(case: Case, x: torch.Tensor, dy: torch.Tensor, y_ref: torch.Tensor | None) -> dict[str, Any]:
    row: dict[str, Any] = {"variant": case.name, "kind": case.kind, "note": case.note,
                           "bytes_per_param": None if case.stored_bytes is None else case.stored_bytes / x.shape[1]
                           / dy.shape[1]}
    if case.error:
        row["error"] = case.error
        return row
    try:
        with torch.no_grad():
            y = case.forward(x)
        if y_ref is not None:
            row["rel_error"] = float((y.float() - y_ref.float()).norm() / y_ref.float().norm())
        del y

        def fwd_bwd():
            case.forward(x).backward(dy)

        _sync()
        x.grad = None
        base = _allocated()
        if DEV == "cuda":
            torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        _sync()
        if DEV == "cuda":
            row["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        x.grad = None
        with torch.no_grad():
            row["fwd_ms"] = bench(lambda: case.forward(x))
        row["fwd_bwd_ms"] = bench(fwd_bwd, grad_to_none=[x])
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return row


def kernel_rows(w: torch.Tensor, quantized: dict[str, Any]) -> list[dict[str, Any]]:
    """Pack and unpack alone: time and bandwidth (bytes read + written) against a device copy."""
    rows = []
    n = w.numel()
    src = torch.empty(n, dtype=torch.bfloat16, device=DEV)
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))
    rows.append({"op": "copy bf16", "ms": copy_ms, "gbps": 2 * n * 2 / copy_ms / 1e6})
    for label, q in quantized.items():
        if q.format == "bf16":
            continue
        fmt, dq = q.format, label.endswith(" dq") or q.format == "int8"
        pack_ms = bench(lambda fmt=fmt, dq=dq: FL.quantize_weight(w, fmt, double_quant=dq))
        unpack_ms = bench(lambda q=q: q.dequantize(torch.bfloat16, out=dst))
        moved = q.nbytes + 2 * n
        rows.append({"op": f"{label} pack", "ms": pack_ms, "gbps": (2 * n + q.nbytes) / pack_ms / 1e6})
        rows.append({"op": f"{label} unpack -> bf16", "ms": unpack_ms, "gbps": moved / unpack_ms / 1e6,
                     "share_of_copy": (moved / unpack_ms) / (2 * n * 2 / copy_ms)})
    return rows


def sweep_fused(x: torch.Tensor, q: Any) -> dict[str, Any]:
    """Forward time of the fused NF4 GEMM for a few tile configs (untuned defaults otherwise)."""
    out: dict[str, Any] = {}
    for cfg in FUSED_CONFIGS:
        try:
            with torch.no_grad():
                out[str(cfg)] = bench(lambda cfg=cfg: nf4.fused_matmul(x, q, torch.bfloat16, config=cfg))
        except Exception as e:  # noqa: BLE001
            out[str(cfg)] = type(e).__name__
    return out


def markdown(rows: list[dict[str, Any]], ref: dict[str, Any] | None) -> str:
    lines = ["| variant | bytes/param | fwd ms | fwd + dx ms | vs bf16 | rel. error | peak extra MiB | note |",
             "|---|---|---|---|---|---|---|---|"]

    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['variant']} | {f(r.get('bytes_per_param'), '.4f')} | - | - | - | - | - | "
                         f"{r['error']} |")
            continue
        ratio = r["fwd_bwd_ms"] / ref["fwd_bwd_ms"] if ref and ref.get("fwd_bwd_ms") else None
        lines.append(f"| {r['variant']} | {f(r.get('bytes_per_param'), '.4f')} | {f(r.get('fwd_ms'), '.3f')} | "
                     f"{f(r.get('fwd_bwd_ms'), '.3f')} | {f(ratio, '.2f')}x | {f(r.get('rel_error'), '.4f')} | "
                     f"{f(r.get('peak_extra_mib'), '.0f')} | {r.get('note', '')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="8192", help="comma-separated token counts M (default 8192)")
    ap.add_argument("--k", type=int, default=4096, help="in_features")
    ap.add_argument("--n", type=int, default=11008, help="out_features")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "weights_results.json"))
    ap.add_argument("--no-sweep", action="store_true", help="skip the fused GEMM's tile sweep")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="check the script on a CPU: tiny shapes, Triton interpreter, no meaningful times")
    args = ap.parse_args()
    global DEV
    if args.cpu_smoke:
        DEV = "cpu"
        args.k, args.n, args.tokens = 128, 256, "64"
        args.json = args.json if args.json != str(ROOT / "benchmarks" / "weights_results.json") else str(
            Path(os.environ.get("TMPDIR", "/tmp")) / "memtune_weights_smoke.json")
    elif not torch.cuda.is_available():
        sys.exit("benchmarks/weights.py needs a CUDA GPU (or --cpu-smoke to check the script)")
    t0 = time.time()
    import triton

    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke test)"
    w = (torch.randn(args.n, args.k, device=DEV) * 0.02).to(torch.bfloat16)
    numel = w.numel()
    ours, extra = our_cases(w)
    peers = peer_cases(w)
    result: dict[str, Any] = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
                              "shape": {"N": args.n, "K": args.k}, "layers": {}, "kernels": [],
                              "overhead_s_per_param": {}, "fused_sweep": {}}
    tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    tables = []
    for m in tokens:
        x = torch.randn(m, args.k, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(m, args.n, device=DEV, dtype=torch.bfloat16)
        with torch.no_grad():
            y_ref = F.linear(x, w)
        ref_case = Case("bf16 cuBLAS (reference)", "reference", lambda x: F.linear(x, w), 2 * numel,
                        "F.linear, frozen bf16 W; autograd computes dx only")
        rows = [run_case(ref_case, x, dy, y_ref)]
        rows += [run_case(c, x, dy, y_ref) for c in ours + peers]
        result["layers"][str(m)] = rows
        tables.append((m, markdown(rows, rows[0])))
        if not args.no_sweep:
            result["fused_sweep"][str(m)] = sweep_fused(x.detach(), extra["quantized"]["nf4 dq"])
        del x, dy, y_ref
        if DEV == "cuda":
            torch.cuda.empty_cache()
    # what the cost model reads: ours minus the reference, forward + input gradient, per parameter
    m_max = str(max(tokens))
    rows = result["layers"][m_max]
    ref_ms = rows[0].get("fwd_bwd_ms")
    for r in rows[1:]:
        if r["kind"] != "ours" or r.get("error") or not ref_ms:
            continue
        label = r["variant"].split(",")[0].removeprefix("ours ")
        fmt = {"nf4 dq": "nf4", "int8": "int8", "bf16": "bf16"}.get(label)
        if fmt is None:
            continue  # nf4 without double quantization: the cost model uses the default (double quant) rows
        kernel = "fused" if "fused" in r["variant"] else "dequant"
        result["overhead_s_per_param"].setdefault(fmt, {})[kernel] = max(0.0, (r["fwd_bwd_ms"] - ref_ms) / 1e3 / numel)
    for d in result["overhead_s_per_param"].values():
        d["best"] = min((k for k in d if k != "best"), key=lambda k: d[k])
    result["kernels"] = kernel_rows(w, extra["quantized"])
    result["elapsed_s"] = time.time() - t0
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n## Frozen quantized weights: {gpu}, torch {torch.__version__}, triton {triton.__version__}")
    for m, table in tables:
        print(f"\nLayer W [{args.n}, {args.k}] (frozen), x [{m}, {args.k}] bf16: forward + input gradient\n")
        print(table)
    print("\nKernels alone (bytes read + written per second):\n")
    print("| op | ms | GB/s | share of copy |\n|---|---|---|---|")
    for r in result["kernels"]:
        share = f"{r['share_of_copy']:.2f}" if "share_of_copy" in r else ""
        print(f"| {r['op']} | {r['ms']:.3f} | {r['gbps']:.0f} | {share} |")
    if result["fused_sweep"]:
        print("\nFused NF4 GEMM forward, tile configs (BM, BN, BK, warps, stages) -> ms:",
              json.dumps(result["fused_sweep"]))
    print(f"\nOverhead per parameter (ours - bf16, fwd + dx, {m_max} tokens): "
          f"{json.dumps(result['overhead_s_per_param'])}")
    print(f"results: {args.json} ({result['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    main()
