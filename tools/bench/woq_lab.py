"""Time the design variants of the int4 decode kernel in tools/bench/woq_lab.cu against cuBLAS.

    python tools/bench/woq_lab.py --out benchmarks/results

Builds woq_lab.cu with nvcc for the running card, then for each decoder shape times every
variant at M = 1 (symmetric int4, groups of 128, bf16 x) exactly as kernels_triton.py times
``woq_matmul``: cold weights (each call takes the next of several weight copies exceeding
twice the L2), inside a CUDA graph, against a bf16 ``F.linear`` of the same shape; the L2-hot
time is for information. Every variant's output is checked against float64 (the ``err``
column, relative to the largest output; a read floor computes nothing and shows ~1). The
variants that lost stay in the table: they are the evidence behind the shipping design.
Results go to ``woq-lab-<gpu>-<date>.json`` and ``.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from kernels import environment  # noqa: E402
from kernels_triton import WOQ_SHAPES, cold_copies, graph_time_ms, graphed_cold_ms, rotating  # noqa: E402


def build(folder: Path) -> ctypes.CDLL:
    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}{'a' if major == 9 else ''}"
    library = folder / "woq_lab.so"
    subprocess.run(
        [
            "nvcc",
            "-O3",
            f"-arch={arch}",
            "-shared",
            "-Xcompiler",
            "-fPIC",
            "-o",
            str(library),
            str(HERE / "woq_lab.cu"),
        ],
        check=True,
    )
    lib = ctypes.CDLL(str(library))
    lib.woq_lab_name.restype = ctypes.c_char_p
    lib.woq_lab_run.argtypes = [ctypes.c_int] + [ctypes.c_size_t] * 4 + [ctypes.c_int, ctypes.c_int, ctypes.c_size_t]
    return lib


def timed(call: Any, operands: tuple[torch.Tensor, ...], reps: int) -> tuple[float, float]:
    """(cold, L2-hot) graphed ms per call, as kernels_triton.woq_row measures them."""
    return graphed_cold_ms(call, cold_copies(*operands), reps), graph_time_ms(rotating(call, [operands]), reps)


def shape_rows(lib: ctypes.CDLL, k: int, n: int, reps: int, only: list[str]) -> dict[str, Any]:
    from ds.kernels.cuda.triton_kernels.opdefs import quantize_weight, woq_matmul

    torch.manual_seed(0)
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    codes, scales, _ = quantize_weight(weight, 4, 128, True)
    reference = woq_matmul(x.double(), codes, scales, None, 4, 128).view(-1)
    y = torch.empty(n, device="cuda", dtype=torch.bfloat16)
    cold, hot = timed(lambda w: F.linear(x, w), (weight,), reps)
    row: dict[str, Any] = {"shape": f"M=1 K={k} N={n}", "bf16_ms": cold, "bf16_l2_hot_ms": hot, "variants": {}}
    for i in range(lib.woq_lab_count()):
        name = lib.woq_lab_name(i).decode()
        if only and not any(part in name for part in only):
            continue

        def call(q: torch.Tensor, s: torch.Tensor, i: int = i) -> None:
            status = lib.woq_lab_run(
                i, x.data_ptr(), q.data_ptr(), s.data_ptr(), y.data_ptr(), n, k, torch.cuda.current_stream().cuda_stream
            )
            assert status == 0, f"CUDA error {status}"

        y.fill_(float("nan"))
        call(codes, scales)
        err = ((y.double() - reference).abs().max() / reference.abs().max()).item()
        v_cold, v_hot = timed(call, (codes, scales), reps)
        row["variants"][name] = {"ms": v_cold, "l2_hot_ms": v_hot, "vs_bf16": cold / v_cold, "err": err}
        print(f"K={k} N={n} {name:32s} {v_cold * 1e3:7.2f} us {cold / v_cold:5.2f}x err {err:.1e}", flush=True)
    return row


def markdown(env: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        f"# int4 decode kernel variants (woq_lab) on {env['gpu']}",
        "",
        f"{env['date']}; torch {env['torch']}, Python {env['python']}. M = 1, symmetric int4, groups of "
        "128, bf16 x; cold weights in CUDA graphs against bf16 `F.linear` (cuBLAS) of the same shape. "
        "Names are explained in tools/bench/woq_lab.cu; `err` is the largest error against float64 "
        "relative to the largest output (the read floor and the empty kernel compute nothing).",
        "",
        "| variant | " + " | ".join(r["shape"] for r in rows) + " | err |",
        "| --- |" + " ---: |" * (len(rows) + 1),
        "| bf16 F.linear (us) | " + " | ".join(f"{r['bf16_ms'] * 1e3:.2f}" for r in rows) + " | |",
    ]
    for name in rows[0]["variants"]:
        cells = [f"{r['variants'][name]['ms'] * 1e3:.2f} us, **{r['variants'][name]['vs_bf16']:.2f}x**" for r in rows]
        err = max(r["variants"][name]["err"] for r in rows)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {err:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--only", nargs="*", default=[], help="time only variants whose names contain one of these")
    args = parser.parse_args()
    from ds.core.kernels import install_kernels

    install_kernels()  # ds's quantizer and float64 reference make the inputs and check the outputs
    with tempfile.TemporaryDirectory() as folder:
        lib = build(Path(folder))
        rows = [shape_rows(lib, k, n, args.reps, args.only) for k, n in WOQ_SHAPES]
    env = environment()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"woq-lab-{env['gpu'].replace(' ', '_')}-{env['date'][:10]}"
    (args.out / f"{stem}.json").write_text(json.dumps({"environment": env, "shapes": rows}, indent=2))
    table = markdown(env, rows)
    (args.out / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
