"""The ``ds`` command line: ``ds report`` and plugin subcommands."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import ds.core
from ds.core.cli import Command, main
from ds.core.errors import ConfigError
from ds.core.kernels import Availability
from ds.core.plugins import Components, PluginFailure, load_components, make_plugin_set


class CudaOnlyNorms:
    name = "cuda-norms"
    priority = 100

    def ops(self) -> list[str]:
        return ["rms_norm"]

    def availability(self, op: str, device_type: str) -> Availability:
        return Availability(device_type == "cuda", "needs a CUDA device")

    def implementation(self, op: str, device_type: str):
        raise AssertionError("never chosen on cpu")


class ReportPlugin:
    @staticmethod
    @ds.core.hookimpl
    def ds_register_kernel_backends(register):
        register(CudaOnlyNorms())

    @staticmethod
    @ds.core.hookimpl
    def ds_report_lines():
        return ["libfancy 2.1 found at /opt/fancy"]


class BrokenNotes:
    @staticmethod
    @ds.core.hookimpl
    def ds_report_lines():
        raise RuntimeError("cannot query driver")


def greet_configure(parser):
    parser.add_argument("--name", required=True)


def greet_run(args) -> int:
    if args.name == "nobody":
        raise ConfigError("greet: --name nobody is not a person; pass a real name")
    print(f"hello {args.name}; greet registered: {'greet' in args.components.commands}")
    return 3


def commands_plugin(name: str, value: object) -> object:
    class Plugin:
        @staticmethod
        @ds.core.hookimpl
        def ds_register_commands(register):
            register(name, value)

    return Plugin


def components_of(**plugins: object) -> Components:
    """Core's builtin plugin plus ``plugins``."""
    return load_components(make_plugin_set(autoload=False, extra_plugins=tuple(plugins.items())))


@pytest.fixture
def report_components() -> Components:
    components = components_of(fancy=ReportPlugin, broken=BrokenNotes)
    components.plugins.failures.append(
        PluginFailure("zero", "ds.zero.plugin", "ds-zero", "ImportError: libcudart.so.12 not found"))
    return components


def test_report_lists_versions_plugins_and_why_each_op_runs_where_it_does(report_components, capsys):
    assert main(["report"], components=report_components) == 0
    out = capsys.readouterr().out
    assert f"ds-core    {ds.core.__version__}" in out
    assert f"torch      {torch.__version__}" in out
    assert f"cuda       {torch.version.cuda or 'none'}" in out
    assert "devices    none" in out  # this machine has no accelerator
    assert "zero (ds.zero.plugin, ds-zero): ImportError: libcudart.so.12 not found" in out
    assert "cuda-norms           priority 100" in out
    assert "torch-reference      priority 0      from core" in out
    assert "rms_norm on cpu: torch-reference (plain torch reference, runs on every device)" in out
    assert "not cuda-norms: unavailable: needs a CUDA device" in out
    assert "adam_step on cpu: torch-reference" in out
    assert "fancy:\n  libfancy 2.1 found at /opt/fancy" in out
    assert "broken:\n  ds_report_lines raised RuntimeError: cannot query driver" in out


def test_report_json_has_the_same_facts(report_components, capsys):
    assert main(["report", "--json"], components=report_components) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["torch"] == torch.__version__
    assert report["devices"] == {"type": None, "count": 0, "devices": []}
    assert [p["name"] for p in report["plugins"]][-2:] == ["fancy", "broken"]
    assert report["plugin_failures"][0]["name"] == "zero"
    choices = {(c["op"], c["device_type"]): c for c in report["kernels"]["ops"]}
    rms = choices[("rms_norm", "cpu")]
    assert rms["backend"] == "torch-reference"
    assert rms["rejected"] == [{"backend": "cuda-norms", "reason": "unavailable: needs a CUDA device"}]
    assert {"layer_norm_backward", "softmax", "adam_step"} <= {op for op, _ in choices}
    assert report["plugin_notes"]["fancy"] == ["libfancy 2.1 found at /opt/fancy"]


def test_plugin_subcommand_runs_with_its_arguments_and_exit_status(capsys):
    components = components_of(greet=commands_plugin("greet", Command("say hello", greet_configure, greet_run)))
    assert main(["greet", "--name", "ada"], components=components) == 3
    assert capsys.readouterr().out == "hello ada; greet registered: True\n"


def test_ds_error_is_one_line_on_stderr_without_traceback(capsys):
    components = components_of(greet=commands_plugin("greet", Command("say hello", greet_configure, greet_run)))
    assert main(["greet", "--name", "nobody"], components=components) == 1
    err = capsys.readouterr().err
    assert err == "ds: error: greet: --name nobody is not a person; pass a real name\n"


@pytest.mark.parametrize("name, value, message", [
    ("report", Command("clash", greet_configure, greet_run), "registers command 'report', which is built into ds"),
    ("greet", ("say hello", greet_configure, greet_run), "pass ds.core.cli.Command(help=..., configure=..., run=...)"),
])
def test_bad_command_registration_is_a_clear_error(name, value, message, capsys):
    assert main(["report"], components=components_of(bad=commands_plugin(name, value))) == 1
    err = capsys.readouterr().err
    assert err.startswith("ds: error: plugin 'bad'") and message in err


def test_bad_arguments_exit_with_argparse_status(capsys):
    assert main(["no-such-command"], components=components_of()) == 2
    assert "invalid choice: 'no-such-command'" in capsys.readouterr().err
    assert main(["--help"], components=components_of()) == 0
    assert "report" in capsys.readouterr().out


def test_python_dash_m_report_uses_the_installed_plugins():
    """The real entry point in a fresh process, with core's builtin plugin and no test doubles."""
    env = {k: v for k, v in os.environ.items() if k != "DS_PLUGINS"} | {"DS_DISABLE_PLUGIN_AUTOLOAD": "1"}
    done = subprocess.run([sys.executable, "-m", "ds.core.cli", "report", "--json"], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["plugins"][0] == {"name": "core", "module": "ds.core.builtin", "distribution": "ds-core",
                                    "version": ds.core.__version__}
    assert [b["name"] for b in report["kernels"]["backends"]] == ["torch-reference"]
    assert all(c["backend"] == "torch-reference" for c in report["kernels"]["ops"] if c["device_type"] == "cpu")
    text = subprocess.run([sys.executable, "-m", "ds.core.cli", "report"], capture_output=True, text=True,
                          env=env, timeout=120, check=True).stdout
    assert "rms_norm on cpu: torch-reference" in text
