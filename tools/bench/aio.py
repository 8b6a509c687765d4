"""Disk offload throughput: ds-zero's async I/O and tensor swapper against what the disk gives.

The yardstick is ``dd`` with O_DIRECT and 1 MiB blocks (one request at a time), and,
when installed, ``fio`` with io_uring and several requests in flight, which is as close
to the disk's ceiling as a user-space program gets. ds is measured as the raw
:class:`ds.zero.aio.AsyncIO` on each backend this machine can start, and as the
:class:`ds.zero.swap.TensorSwapper` moving fp32 tensors in place (aligned CPU tensors) and
bounced through its pool of buffers (any other tensor). One more row moves the file
through a small reused buffer, as fio and dd do: it isolates the I/O engine from the cost
of landing data in (or taking it from) memory the size of the transfer, which a swapper
cannot avoid.

Every write overwrites a file that was written in full before (the steady state of
swapping, where the same files are rewritten every step), every transfer is O_DIRECT and
none is followed by fsync, for dd and fio alike. Rows are interleaved round by round, in
a different order each round, so that noise from the host hits every row alike; the best
round is the headline, the median is given beside it.

    python tools/bench/aio.py --dir /tmp --out benchmarks/results/aio
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ds.zero.aio import AioConfig, AsyncIO, aligned_empty, native_aio, open_file
from ds.zero.swap import SwapConfig, TensorSwapper

MIB = 1 << 20
Measure = Callable[[], float]  # one transfer; returns the seconds it took


def dd(path: Path, nbytes: int, *, write: bool) -> Measure:
    count = nbytes // MIB
    command = (["dd", "if=/dev/zero", f"of={path}", "oflag=direct", "conv=notrunc"] if write
               else ["dd", f"if={path}", "of=/dev/null", "iflag=direct"])
    command += ["bs=1M", f"count={count}"]

    def run() -> float:  # dd's own timing, so process start-up is not counted against it
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        seconds = re.search(r"copied, ([\d.e+-]+) s", result.stderr)
        if seconds is None:
            raise RuntimeError(f"unexpected dd output: {result.stderr!r}")
        return float(seconds.group(1))
    return run


def fio(path: Path, nbytes: int, *, write: bool, depth: int, block: int) -> Measure:
    mode = "write" if write else "read"
    command = ["fio", "--name=bench", f"--filename={path}", f"--size={nbytes}", f"--bs={block}",
               f"--rw={mode}", "--direct=1", "--ioengine=io_uring", f"--iodepth={depth}",
               "--output-format=json"]

    def run() -> float:
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        job = json.loads(result.stdout[result.stdout.index("{"):])["jobs"][0][mode]
        return job["io_bytes"] / job["bw_bytes"]
    return run


def raw_aio(io: AsyncIO, path: Path, buffer: torch.Tensor, *, write: bool) -> Measure:
    def run() -> float:
        with open_file(path, write=True) as file:
            started = time.perf_counter()
            submit = io.submit_write if write else io.submit_read
            io.wait(submit(file, buffer.data_ptr(), buffer.numel(), 0))
            return time.perf_counter() - started
    return run


def ring_aio(io: AsyncIO, path: Path, nbytes: int, ring: torch.Tensor, *, write: bool) -> Measure:
    """The whole file through a small reused buffer, one block per request, as fio and dd do."""
    block, depth = io.config.block_size, ring.numel() // io.config.block_size

    def run() -> float:
        submit = io.submit_write if write else io.submit_read
        with open_file(path, write=True) as file:
            started = time.perf_counter()
            pending: list[int] = []
            for index in range(nbytes // block):
                if len(pending) == depth:
                    io.wait(pending.pop(0))
                pending.append(submit(file, ring.data_ptr() + index % depth * block, block, index * block))
            for request in pending:
                io.wait(request)
            return time.perf_counter() - started
    return run


def swapper_rows(swapper: TensorSwapper, tensor: torch.Tensor, out: torch.Tensor) -> tuple[Measure, Measure]:
    def write() -> float:
        started = time.perf_counter()
        swapper.swap_out("tensor", tensor).wait()
        return time.perf_counter() - started

    def read() -> float:
        started = time.perf_counter()
        swapper.swap_in("tensor", out).wait()
        return time.perf_counter() - started
    return write, read


def bench_size(folder: Path, nbytes: int, rounds: int, config: AioConfig, backends: list[str]) -> dict:
    path = folder / f"bench-{nbytes}.bin"
    buffer = aligned_empty(nbytes, pin=False).fill_(0x5A)
    rows: dict[str, tuple[Measure, Measure]] = {"dd bs=1M O_DIRECT": (dd(path, nbytes, write=True),
                                                                      dd(path, nbytes, write=False))}
    if shutil.which("fio"):
        depth, block = config.queue_depth, config.block_size
        rows[f"fio io_uring qd={depth} bs={block // MIB}M"] = (
            fio(path, nbytes, write=True, depth=depth, block=block),
            fio(path, nbytes, write=False, depth=depth, block=block))
    queues = [AsyncIO(config.model_copy(update={"backend": name})) for name in backends]
    for io in queues:
        rows[f"ds AsyncIO {io.backend}"] = (raw_aio(io, path, buffer, write=True),
                                            raw_aio(io, path, buffer, write=False))
    ring = aligned_empty(config.queue_depth * config.block_size, pin=False).fill_(0x5A)
    rows[f"ds AsyncIO {queues[0].backend}, {ring.numel() // MIB} MiB ring (as fio)"] = (
        ring_aio(queues[0], path, nbytes, ring, write=True), ring_aio(queues[0], path, nbytes, ring, write=False))
    # Each tensor is read back into itself: the same bytes, and half the memory of a 4 GiB run.
    swap_config = SwapConfig(aio=config)
    in_place = TensorSwapper(folder / "in-place", swap_config)
    aligned = buffer.view(torch.float32)
    rows["ds TensorSwapper in place"] = swapper_rows(in_place, aligned, aligned)
    bounced = TensorSwapper(folder / "bounced", swap_config)
    unaligned = torch.empty(aligned.numel() + 1)[1:].copy_(aligned)
    rows[f"ds TensorSwapper bounced ({swap_config.buffer_count} x {swap_config.buffer_bytes // MIB} MiB pool)"] = (
        swapper_rows(bounced, unaligned, unaligned))

    with open_file(path, write=True) as file:  # every write below overwrites written blocks
        os.posix_fallocate(file.fd, 0, nbytes)  # in one extent, as the swapper allocates its files
        queues[0].wait(queues[0].submit_write(file, buffer.data_ptr(), nbytes, 0))
    times: dict[str, dict[str, list[float]]] = {name: {"write": [], "read": []} for name in rows}
    order = list(rows)
    for round_index in range(rounds + 1):  # round 0 warms up (and writes the swap files)
        random.Random(round_index).shuffle(order)  # no row always follows the same neighbour
        for name in order:
            write, read = rows[name]
            for op, measure in (("write", write), ("read", read)):
                seconds = measure()
                if round_index:
                    times[name][op].append(seconds)
    for io in queues:
        io.close()
    in_place.close()
    bounced.close()
    path.unlink()

    results = {}
    for name, ops in times.items():
        results[name] = {f"{op}_gbytes_per_s_{kind}": nbytes / f(seconds) / 1e9
                         for op, seconds in ops.items()
                         for kind, f in (("best", min), ("median", statistics.median))}
    add_ratios(results)
    return {"bytes": nbytes, "results": results}


def add_ratios(results: dict[str, dict[str, float]]) -> None:
    """Each row's best against dd's best and, when measured, fio's."""
    for yardstick in ("dd", "fio"):
        baseline = next((row for name, row in results.items() if name.startswith(yardstick + " ")), None)
        for row in results.values():
            for op in ("write", "read"):
                if baseline is not None:
                    row[f"{op}_vs_{yardstick}"] = row[f"{op}_gbytes_per_s_best"] / baseline[f"{op}_gbytes_per_s_best"]


def copy_gbytes_per_s(nbytes: int = 256 * MIB, repeats: int = 3) -> float:
    """Bytes a plain tensor copy moves per second: the ceiling of the bounced rows."""
    source, target = torch.ones(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - started)
    return nbytes / best / 1e9


def disk_info(folder: Path) -> dict:
    """The block device and file system under ``folder``, as far as /proc and /sys tell."""
    best = ("", "", "")
    with open("/proc/mounts") as mounts:
        for line in mounts:
            device, mount_point, fs_type = line.split()[:3]
            if str(folder.resolve()).startswith(mount_point) and len(mount_point) >= len(best[1]):
                best = (device, mount_point, fs_type)
    info = {"device": best[0], "mount_point": best[1], "file_system": best[2]}
    block = Path("/sys/block") / Path(best[0]).name
    for key, relative in (("model", "device/model"), ("rotational", "queue/rotational"),
                          ("logical_block_size", "queue/logical_block_size"), ("scheduler", "queue/scheduler"),
                          ("size_sectors", "size")):
        if (block / relative).exists():
            info[key] = (block / relative).read_text().strip()
    return info


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _version(command: list[str]) -> str | None:
    if not shutil.which(command[0]):
        return None
    result = subprocess.run(command, capture_output=True, text=True)
    return (result.stdout or result.stderr).splitlines()[0].strip()


def render_markdown(report: dict) -> str:
    machine, disk = report["machine"], report["disk"]
    lines = [
        "# Disk offload I/O benchmark",
        "",
        f"- Date: {report['date']}",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']:.0f} GiB, "
        f"kernel {machine['kernel']}; load average at start {machine['load_average_start']}, "
        f"end {machine['load_average_end']}",
        f"- Disk: {disk['device']} ({disk.get('model') or 'no model string'}, rotational "
        f"{disk.get('rotational', '?')}, logical block {disk.get('logical_block_size', '?')} B, scheduler "
        f"{disk.get('scheduler', '?')}), {disk['file_system']} mounted at {disk['mount_point']}; files in "
        f"{report['folder']}",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items() if v)}",
        f"- ds config: queue depth {report['aio']['queue_depth']}, block {report['aio']['block_size'] // MIB} MiB; "
        f"best of {report['rounds']} interleaved rounds (median in brackets); GB = 1e9 bytes",
        "",
    ]
    for size in report["sizes"]:
        lines += [f"## {size['bytes'] / 2**30:.2f} GiB", "",
                  "| row | write GB/s | read GB/s | write vs dd | read vs dd | write vs fio | read vs fio |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, row in size["results"].items():
            ratios = " | ".join(f"{100 * row[key]:.0f}%" if key in row else "-" for key in
                                ("write_vs_dd", "read_vs_dd", "write_vs_fio", "read_vs_fio"))
            lines.append(
                f"| {name} | {row['write_gbytes_per_s_best']:.2f} ({row['write_gbytes_per_s_median']:.2f}) "
                f"| {row['read_gbytes_per_s_best']:.2f} ({row['read_gbytes_per_s_median']:.2f}) | {ratios} |")
        lines.append("")
    lines += [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="folder on the disk to measure")
    parser.add_argument("--sizes-mib", default="256,1024,4096", help="transfer sizes (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per size")
    parser.add_argument("--queue-depth", type=int, default=AioConfig().queue_depth)
    parser.add_argument("--block-mib", type=int, default=AioConfig().block_size // MIB)
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)

    native = native_aio()
    backends = [*(native.module.available_backends() if native.module else []), "threads"]
    config = AioConfig(queue_depth=args.queue_depth, block_size=args.block_mib * MIB)
    notes = [] if native.module else [f"native extension unavailable: {native.unavailable_reason}"]
    if not shutil.which("fio"):
        notes.append("fio not installed (apt-get install fio): only dd is the yardstick")
    copy_rate = copy_gbytes_per_s()
    notes.append("The swapper rows include its bookkeeping; the bounced row also copies every byte "
                 f"between the tensor and the pool buffers, and a plain 256 MiB tensor copy ran at "
                 f"{copy_rate:.1f} GB/s here at the start.")
    load_start = os.getloadavg()
    folder = Path(tempfile.mkdtemp(prefix="ds-aio-bench-", dir=args.dir))
    try:
        sizes = []
        for size_mib in (int(s) for s in args.sizes_mib.split(",")):
            size = bench_size(folder, size_mib * MIB, args.rounds, config, backends)
            sizes.append(size)
            for name, row in size["results"].items():
                print(f"{size_mib:6d} MiB  {name:55s} write {row['write_gbytes_per_s_best']:5.2f} GB/s "
                      f"({100 * row['write_vs_dd']:4.0f}% of dd)  read {row['read_gbytes_per_s_best']:5.2f} "
                      f"GB/s ({100 * row['read_vs_dd']:4.0f}% of dd)", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "kernel": platform.release(),
                    "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
                    "load_average_start": [round(x, 2) for x in load_start],
                    "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "disk": disk_info(Path(args.dir)),
        "folder": args.dir,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "ds-zero": importlib.metadata.version("ds-zero"),
                     "dd": _version(["dd", "--version"]), "fio": _version(["fio", "--version"])},
        "aio": config.model_dump(),
        "backends": backends,
        "rounds": args.rounds,
        "sizes": sizes,
        "notes": notes,
    }
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        out.with_suffix(".md").write_text(render_markdown(report))
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
