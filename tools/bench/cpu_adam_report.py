"""The CPU Adam benchmark's comparisons and markdown (cpu_adam.py measures, this reports)."""

from __future__ import annotations

from cpu_adam_ceiling import CEILING


def ratios(size: dict, isa: str, metric: str) -> dict[str, float]:
    """One size's comparisons, by ``metric`` (a per-row rate: wall-clock best or per CPU-second)."""
    rows = size["results"]

    def rate(name: str) -> float:
        return float(rows[name][metric])

    ours, ours_copy = rate(f"ds CPUAdam [{isa}]"), rate(f"ds CPUAdam [{isa}] + bf16 copy (fused)")
    offload, fused = rate(f"ds adam_update_ [{isa}], bf16 grads + bf16 copy"), rate("torch AdamW fused")
    result = {
        "ceiling / torch fused": rate(CEILING) / fused,
        "ours / ceiling": ours / rate(CEILING),
        "ours / torch fused": ours / fused,
        "ours+bf16 copy / torch fused (no copy)": ours_copy / fused,
        "ours+bf16 copy / torch fused + copy": ours_copy / rate("torch AdamW fused + bf16 copy"),
        "ours, bf16 grads + bf16 copy / torch fused (fp32 grads, no copy)": offload / fused,
        "ours / torch foreach": ours / rate("torch AdamW foreach"),
    }
    if "DeepSpeedCPUAdam" in rows:
        result["ours / DeepSpeedCPUAdam"] = ours / rate("DeepSpeedCPUAdam")
        result["ours+bf16 copy / DeepSpeedCPUAdam + copy"] = ours_copy / rate("DeepSpeedCPUAdam + bf16 copy")
    return result


def render_markdown(report: dict) -> str:
    """The report as the markdown committed beside its JSON under benchmarks/results/."""
    machine, isa, adamw = report["machine"], report["isa"], report["adamw"]
    lines = [
        "# CPU Adam benchmark",
        "",
        f"- Date: {report['date']}",
        f"- CPU: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']:.0f} GiB; "
        f"load average at start {machine['load_average_start']}, end {machine['load_average_end']}",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}",
        f"- ds CPUAdam path: {isa} ({report['omp_threads']} OpenMP threads); paths on this CPU: "
        f"{', '.join(report['available_isas'])}",
        f"- Memory bandwidth, 1 GB tensor copy (read+write): {report['copy_gbytes_per_s']:.1f} GB/s",
        f"- AdamW, lr {adamw['lr']}, weight decay {adamw['weight_decay']}; fp32 params in tensors of "
        f"{report['tensor_elements'] / 1e6:.0f}M elements; {report['rounds']} interleaved rounds. "
        "Wall clock: best round (median in brackets). Per CPU-second: parameters updated per "
        "second of process CPU time (all threads, memory stalls included), median round; "
        "stable under load. Bytes moved: 28 per parameter, 30 with the bf16 copy, 28 with bf16 "
        "gradients and the bf16 copy. The ceiling row is one fused pass with Adam's reads and writes "
        "(28 bytes per parameter) and an add per element; vs ceiling compares GB/s moved.",
        "",
    ]
    for size in report["sizes"]:
        lines += [
            f"## {size['total_params'] / 1e6:.0f}M parameters ({size['tensors']} tensors)",
            "",
            "| implementation | M params/s, wall | M params per CPU-second | GB/s moved (wall) "
            "| vs 1 GB copy | vs ceiling | ms/step |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        ceiling = size["results"][CEILING]["gbytes_per_s_best"]
        for name, row in size["results"].items():
            share = 100 * row["gbytes_per_s_best"] / report["copy_gbytes_per_s"]
            lines.append(
                f"| {name} | {row['mparams_per_s_best']:.0f} ({row['mparams_per_s_median']:.0f}) "
                f"| {row['mparams_per_cpu_s']:.0f} | {row['gbytes_per_s_best']:.1f} "
                f"| {share:.0f}% | {100 * row['gbytes_per_s_best'] / ceiling:.0f}% "
                f"| {1e3 * row['seconds_per_step_best']:.1f} |"
            )
        lines += ["", "| ratio | wall, best | per CPU-second |", "| --- | ---: | ---: |"]
        lines += [
            f"| {name} | {value:.2f}x | {size['ratios_cpu_time'][name]:.2f}x |"
            for name, value in size["ratios"].items()
        ]
        lines.append("")
    lines += [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"
