"""``ds report``: what is installed, what hardware torch sees, and why each op runs where it does.

The report is collected as one JSON-ready dict (``--json`` prints it) and rendered as
text from that dict, so tools and people read the same facts. Collecting never installs
anything: kernel selection is planned from the components, not applied.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import asdict
from typing import Any

import torch

import ds.core
from ds.core.kernels import local_device_types, plan_kernels
from ds.core.plugins import Components


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    report = collect_report(args.components)
    print(json.dumps(report, indent=2) if args.json else render_report(report))
    return 0


def collect_report(components: Components) -> dict[str, Any]:
    """Every fact ``ds report`` shows, as plain JSON-ready data."""
    return {
        "ds_core": ds.core.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "devices": _devices(),
        "plugins": [asdict(info) for info in components.plugins.loaded],
        "plugin_failures": [asdict(failure) for failure in components.plugins.failures],
        "kernels": plan_kernels(components).to_dict(),
        "plugin_notes": _plugin_notes(components),
    }


def _devices() -> dict[str, Any]:
    """The accelerator torch sees (CUDA, ROCm through torch.cuda, XPU, MPS, ...), if any."""
    accelerators = local_device_types()[1:]
    if not accelerators:
        return {"type": None, "count": 0, "devices": []}
    device_type = accelerators[0]
    module = getattr(torch, device_type)
    count = module.device_count()
    devices = []
    for index in range(count):
        name = module.get_device_name(index) if hasattr(module, "get_device_name") else None
        capability = module.get_device_capability(index) if hasattr(module, "get_device_capability") else None
        devices.append({
            "index": index,
            "name": name,
            "capability": ".".join(map(str, capability)) if isinstance(capability, tuple) else None,
        })
    return {"type": device_type, "count": count, "devices": devices}


def _plugin_notes(components: Components) -> dict[str, list[str]]:
    """Each plugin's ``ds_report_lines``; a plugin whose hook raises gets the error as its note."""
    notes: dict[str, list[str]] = {}
    for impl in reversed(components.hook.ds_report_lines.get_hookimpls()):  # registration order
        try:
            lines = impl.function()
        except Exception as exc:  # noqa: BLE001 - the report must survive a broken plugin
            lines = [f"ds_report_lines raised {type(exc).__name__}: {exc}"]
        if lines:
            notes[impl.plugin_name] = [str(line) for line in lines]
    return notes


def render_report(report: dict[str, Any]) -> str:
    """The human-readable form of :func:`collect_report`'s dict."""
    python = report["python"]
    lines = [
        f"{'ds-core':<10} {report['ds_core']}",
        f"{'torch':<10} {report['torch']}",
        f"{'cuda':<10} {report['cuda'] or 'none'}",
        f"{'hip':<10} {report['hip'] or 'none'}",
        f"{'python':<10} {python['version']} ({python['executable']})",
        f"{'devices':<10} {_render_devices(report['devices'])}",
        "",
        "plugins:",
    ]
    for plugin in report["plugins"]:
        origin = "not installed"
        if plugin["distribution"]:
            origin = f"{plugin['distribution']} {plugin['version'] or ''}".strip()
        lines.append(f"  {plugin['name']:<16} {origin:<24} {plugin['module']}")
    lines.append("plugins that failed to load:")
    lines += [f"  {f['name']} ({f['module']}, {f['distribution']}): {f['error']}" for f in report["plugin_failures"]]
    lines += ["  none"] if not report["plugin_failures"] else []
    kernels = report["kernels"]
    lines.append("kernel backends, in the order they are tried:")
    for backend in kernels["backends"]:
        problem = f"  BROKEN: {backend['problem']}" if backend["problem"] else ""
        lines.append(f"  {backend['name']:<20} priority {backend['priority']!s:<6} from {backend['plugin']}{problem}")
    lines += ["  none registered"] if not kernels["backends"] else []
    lines.append("kernel ops:")
    for choice in kernels["ops"]:
        runner = choice["backend"] or "NOTHING"
        lines.append(f"  {choice['op']} on {choice['device_type']}: {runner} ({choice['reason']})")
        lines += [f"      not {r['backend']}: {r['reason']}" for r in choice["rejected"]]
    for plugin, notes in report["plugin_notes"].items():
        lines.append(f"{plugin}:")
        lines += [f"  {note}" for note in notes]
    return "\n".join(lines)


def _render_devices(devices: dict[str, Any]) -> str:
    if not devices["count"]:
        return "none"
    described = []
    for device in devices["devices"]:
        capability = f", capability {device['capability']}" if device["capability"] else ""
        described.append(f"[{device['index']}] {device['name']}{capability}")
    return f"{devices['count']} x {devices['type']}: " + "; ".join(described)
