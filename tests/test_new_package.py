"""tools/new_package.py turns the package template into a package nox and ds can use."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("new_package", ROOT / "tools" / "new_package.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


new_package = load_tool()


def without_ds_settings(environ: os._Environ[str]) -> dict[str, str]:
    return {key: value for key, value in environ.items() if not key.startswith("DS_")}


def test_dashed_name_becomes_nested_import_path_with_shared_version(tmp_path: Path) -> None:
    target = new_package.create_package("kernels-xpu", "Intel GPU kernels.", packages_dir=tmp_path)

    project = tomllib.loads((target / "pyproject.toml").read_text())["project"]
    core_version = tomllib.loads((ROOT / "packages" / "core" / "pyproject.toml").read_text())["project"]["version"]
    assert (project["name"], project["version"]) == ("ds-kernels-xpu", core_version)
    assert project["dependencies"] == [f"ds-core=={core_version}"]
    assert project["description"] == "ds kernels-xpu: Intel GPU kernels"
    assert project["entry-points"]["ds.plugins"] == {"kernels-xpu": "ds.kernels.xpu.plugin"}
    assert (target / "src" / "ds" / "kernels" / "xpu" / "plugin.py").is_file()
    assert not (target / "src" / "ds" / "__init__.py").exists()

    generated = [path for path in target.rglob("*") if path.is_file()]
    assert {path.name for path in generated} == {"pyproject.toml", "README.md", "__init__.py", "plugin.py",
                                                  "test_plugin.py"}
    for path in generated:
        assert "{{" not in path.read_text(), f"unfilled placeholder in {path.relative_to(target)}"
        if path.suffix == ".py":
            compile(path.read_text(), str(path), "exec")


@pytest.mark.slow
def test_generated_package_installs_and_its_own_tests_pass(tmp_path: Path) -> None:
    """Installed without dependencies into a throwaway prefix beside this environment's ds-core."""
    target = new_package.create_package("widgets", "Widgets for testing the template", packages_dir=tmp_path)
    prefix = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(prefix),
                    str(target)], check=True)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(target),
         "-c", str(target / "pyproject.toml"), str(target / "tests")],
        env={**without_ds_settings(os.environ), "PYTHONPATH": str(prefix)}, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


@pytest.mark.parametrize("name", ["Moe", "2d", "moe_layers", "-moe", "moe-", ""])
def test_invalid_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="is not valid"):
        new_package.create_package(name, "x", packages_dir=tmp_path)


def test_existing_folder_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "moe").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        new_package.create_package("moe", "x", packages_dir=tmp_path)
