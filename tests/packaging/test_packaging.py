"""ds as a user installs it: built wheels in a fresh virtual environment.

One scenario, in the order a user lives it: ds-core alone (its report lists core and
nothing else); then the reference third-party plugin from ``ds-example-plugin/``
(discovered through its entry point: a config can name its optimizer and its kernel
op runs on its backend); then a plugin that raises on import (reported by ``ds
report`` and skipped, while training still works). The environment does not see this
process's site-packages, so nothing installed here for development can leak in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CORE = ROOT / "packages" / "core"
EXAMPLE_PLUGIN = HERE / "ds-example-plugin"
BROKEN_PLUGIN = HERE / "ds-broken-plugin"
TORCH = "torch==2.13.0"

pytestmark = pytest.mark.slow


class UserEnvironment:
    """A fresh virtual environment and the commands a user would type in it."""

    def __init__(self, path: Path) -> None:
        venv.EnvBuilder(with_pip=True, clear=True).create(path)
        self.bin = path / "bin"
        # The user's shell, minus anything that would point ds at other code or plugins.
        self.env = {key: value for key, value in os.environ.items()
                    if key != "PYTHONPATH" and not key.startswith("DS_")}

    def run(self, program: str, *args: str | Path) -> str:
        result = subprocess.run([str(self.bin / program), *map(str, args)], env=self.env,
                                capture_output=True, text=True, check=False)
        assert result.returncode == 0, f"{program} {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def pip_install(self, *args: str | Path) -> None:
        self.run("python", "-m", "pip", "install", "--quiet", *args)

    def report(self) -> dict:
        return json.loads(self.run("ds", "report", "--json"))

    def train_one_step(self) -> dict:
        return json.loads(self.run("python", HERE / "train_one_step.py").strip().splitlines()[-1])


def build_wheels(out: Path) -> dict[str, Path]:
    """Wheels of ds-core and the two test plugins, by distribution name."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out),
                    str(CORE), str(EXAMPLE_PLUGIN), str(BROKEN_PLUGIN)], check=True)
    wheels = {path.name.split("-")[0].replace("_", "-"): path for path in out.glob("*.whl")}
    assert set(wheels) == {"ds-core", "ds-example-plugin", "ds-broken-plugin"}, sorted(wheels)
    return wheels


def plugin_names(report: dict) -> list[str]:
    return [plugin["name"] for plugin in report["plugins"]]


def test_wheels_install_and_plugins_are_found_or_reported(tmp_path: Path) -> None:
    wheels = build_wheels(tmp_path / "dist")
    names_in_core_wheel = zipfile.ZipFile(wheels["ds-core"]).namelist()
    assert "ds/__init__.py" not in names_in_core_wheel, "ds is a namespace package: no wheel may ship ds/__init__.py"
    assert "ds/core/__init__.py" in names_in_core_wheel

    user = UserEnvironment(tmp_path / "venv")
    user.pip_install("--no-compile", TORCH)  # first, so ds-core's plain torch requirement is met
    user.pip_install(wheels["ds-core"])

    report = user.report()
    assert plugin_names(report) == ["core"]
    assert report["plugin_failures"] == []
    assert report["plugins"][0]["distribution"] == "ds-core"

    user.pip_install(wheels["ds-example-plugin"])
    report = user.report()
    assert plugin_names(report) == ["core", "example"]
    example = report["plugins"][1]
    assert (example["distribution"], example["version"]) == ("ds-example-plugin", "0.1.0")
    assert "example-cpu" in [backend["name"] for backend in report["kernels"]["backends"]]
    silu_on_cpu = [op for op in report["kernels"]["ops"] if (op["op"], op["device_type"]) == ("example_silu", "cpu")]
    assert [op["backend"] for op in silu_on_cpu] == ["example-cpu"]

    step = user.train_one_step()
    assert step["global_steps"] == 1
    # Sign descent moves every weight by exactly lr: no torch optimizer would.
    assert step["moves"] == pytest.approx([step["lr"]] * 5)
    assert step["example_silu_backend"] == "example-cpu"
    assert step["example_silu_matches_reference"] is True

    user.pip_install(wheels["ds-broken-plugin"])
    report = user.report()
    assert plugin_names(report) == ["core", "example"]
    [failure] = report["plugin_failures"]
    assert (failure["name"], failure["distribution"]) == ("broken", "ds-broken-plugin")
    assert "fails on import on purpose" in failure["error"]
    assert user.train_one_step()["global_steps"] == 1
