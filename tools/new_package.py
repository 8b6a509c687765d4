"""Start a new ds package from tools/package_template/.

    python tools/new_package.py moe "MoE layers, gating and expert parallelism"

creates packages/moe/: distribution ds-moe, import path ds.moe, entry point moe in the
group ds.plugins, the monorepo's shared version, a README, a plugin module and a test
that ds loads it. nox finds it from then on (``nox -s "tests(moe)"``). A dash in the
name nests the import path, as for the kernel packages: kernels-rocm -> ds.kernels.rocm.
The template is pure Python (hatchling); a package with native code switches its build
backend to scikit-build-core as packages/zero does.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "tools" / "package_template"
PACKAGES = ROOT / "packages"
MODULE_PLACEHOLDER_DIR = "_package"
VALID_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z][a-z0-9]*)*$")


def monorepo_version() -> str:
    """All packages share one version; core's is the reference."""
    return tomllib.loads((PACKAGES / "core" / "pyproject.toml").read_text())["project"]["version"]


def create_package(name: str, summary: str, packages_dir: Path = PACKAGES) -> Path:
    """Copy the template to ``packages_dir/name`` with every placeholder filled in."""
    if not VALID_NAME.match(name):
        raise ValueError(f"package name {name!r} is not valid: use lower-case words joined by dashes, e.g. 'moe' "
                         "or 'kernels-xpu'")
    target = packages_dir / name
    if target.exists():
        raise FileExistsError(f"{target} already exists; choose another name or remove it first")
    values = {
        "{{name}}": name,
        "{{module}}": "ds." + name.replace("-", "."),
        "{{version}}": monorepo_version(),
        "{{summary}}": summary.rstrip("."),
    }
    for source in sorted(TEMPLATE.rglob("*")):
        relative = source.relative_to(TEMPLATE)
        if not source.is_file() or "__pycache__" in relative.parts:
            continue
        parts = [segment for part in relative.parts
                 for segment in (name.split("-") if part == MODULE_PLACEHOLDER_DIR else [part])]
        text = source.read_text()
        for placeholder, value in values.items():
            text = text.replace(placeholder, value)
        destination = target.joinpath(*parts)
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_text(text)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="folder under packages/ and suffix of the distribution name (ds-NAME)")
    parser.add_argument("summary", help="one sentence: what the package owns")
    args = parser.parse_args()
    print(f"created {create_package(args.name, args.summary).relative_to(ROOT)}")


if __name__ == "__main__":
    main()
