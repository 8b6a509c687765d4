"""Every development task of ds is a nox session; ``nox -l`` reads like the CI matrix.

    nox -s tests              # every package's tests, each beside core alone, then tests/
    nox -s "tests(zero)"      # one package: only ds-core and ds-zero are installed
    nox -s lint typecheck     # ruff, mypy
    nox -s demo               # two CPU processes train the example GPT for a few steps
    nox -s wheels packaging   # build every wheel into dist/; install them as a user would
    nox -s kernels            # build the packages with native (CMake) extensions

Packages are found, not listed: every ``packages/<name>/pyproject.toml`` gets a
``tests(<name>)`` session. Each session installs ``torch==2.13.0`` before anything else,
so ds's plain ``torch`` requirement is already satisfied and pip never fetches another
(multi-GB CUDA) build. Arguments after ``--`` go to the tool a session runs
(``nox -s "tests(core)" -- -k checkpoint -x``).
"""

from __future__ import annotations

import os
import shutil
import tomllib
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
PACKAGES = ROOT / "packages"
DIST = ROOT / "dist"
CORE = "core"
INTEGRATION = "integration"
TORCH = "torch==2.13.0"
TEST_REQUIREMENTS = ("pytest>=8", "pytest-timeout>=2.3")
# Tests that build real Hugging Face models from configs (core's model transforms, ds-zero's
# export, the training benchmark's smoke test) need transformers; nothing downloads.
SUITE_TEST_REQUIREMENTS = {suite: ["transformers>=4.45"] for suite in ("core", "zero", "integration")}
# A test that hangs (say, a collective that never completes) fails after this many
# seconds instead of stalling the whole run.
TEST_TIMEOUT_S = "900"

nox.options.default_venv_backend = "venv"
nox.options.reuse_venv = "yes"
nox.options.sessions = ["lint", "tests"]


def package_names() -> list[str]:
    """Folders under packages/ that are installable distributions (have a pyproject.toml)."""
    return sorted(path.parent.name for path in PACKAGES.glob("*/pyproject.toml"))


def native_package_names() -> list[str]:
    """Packages whose wheel compiles an extension with CMake (scikit-build-core)."""
    return [name for name in package_names() if (PACKAGES / name / "CMakeLists.txt").is_file()]


def package_dirs(names: list[str]) -> list[str]:
    return [str(PACKAGES / name) for name in names]


def third_party_requirements(names: list[str]) -> list[str]:
    """What the packages need from outside the monorepo (their ``ds-*`` siblings left out)."""
    requirements: list[str] = []
    for name in names:
        project = tomllib.loads((PACKAGES / name / "pyproject.toml").read_text())["project"]
        requirements += [req for req in project.get("dependencies", []) if not req.startswith("ds-")]
    return sorted(set(requirements))


def install_torch(session: nox.Session) -> None:
    """The pinned CPU-or-CUDA torch this machine's pip finds first, not compiled at install
    (most of its modules are never imported): .pyc are written on import instead, even where
    PYTHONDONTWRITEBYTECODE is set (it is on CI's machine). Without them each of the hundreds
    of processes the tests start compiles torch, sympy and ds from source again: 3-6 s a process.
    """
    session.install("--no-compile", TORCH)
    session.env["PYTHONDONTWRITEBYTECODE"] = ""


def install_packages(session: nox.Session, names: list[str]) -> None:
    """Install packages as users get them (built wheels, not editable), in one resolve.

    One pip call lets ``ds-zero``'s ``ds-core==0.1.0`` requirement resolve to the local
    folder instead of an index.
    """
    session.install(*package_dirs(names))


@nox.session
@nox.parametrize("suite", [*package_names(), INTEGRATION], ids=[*package_names(), INTEGRATION])
def tests(session: nox.Session, suite: str) -> None:
    """A package's tests with only ds-core and that package installed; or tests/ with all.

    Installing a package beside core alone proves it does not lean on a sibling it does
    not declare. ``integration`` runs the cross-package tests (composition, the packaging
    round trip, the hook inventory) with every package installed.
    """
    install_torch(session)
    # CI's compile check of the GPU kernels: one architecture each keeps the build short.
    session.env["DS_CUDA_ARCHS"] = os.environ.get("DS_CUDA_ARCHS", "90a-real")
    session.env["DS_HIP_ARCHS"] = os.environ.get("DS_HIP_ARCHS", "gfx90a")
    if suite == INTEGRATION:
        install_packages(session, package_names())
        test_path = "tests"
    else:
        install_packages(session, sorted({CORE, suite}))
        test_path = f"packages/{suite}/tests"
    session.install(*TEST_REQUIREMENTS, *SUITE_TEST_REQUIREMENTS.get(suite, []))
    session.run("pytest", test_path, f"--timeout={TEST_TIMEOUT_S}", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff with the shared settings of the root pyproject.toml."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", *(session.posargs or ["."]))


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy over every package's sources, as one program (``ds`` is a namespace package)."""
    names = package_names()
    install_torch(session)
    session.install("mypy>=1.10", "types-PyYAML", *third_party_requirements(names))
    sources = [str(PACKAGES / name / "src") for name in names]
    session.run("mypy", *(session.posargs or sources), env={"MYPYPATH": os.pathsep.join(sources)})


@nox.session
def demo(session: nox.Session) -> None:
    """Two CPU processes train the example GPT on Shakespeare for a few steps."""
    install_torch(session)
    install_packages(session, package_names())
    checkpoints = Path(session.create_tmp()) / "checkpoints"
    shutil.rmtree(checkpoints, ignore_errors=True)
    session.run(
        "torchrun", "--nproc-per-node", "2", "examples/train_gpt.py",
        "--steps", "20", "--checkpoint-dir", str(checkpoints), *session.posargs,
        env={"OMP_NUM_THREADS": "1"},
    )


@nox.session
def wheels(session: nox.Session) -> None:
    """Every package's wheel into dist/ (build backends come from the index, isolated)."""
    DIST.mkdir(exist_ok=True)
    session.run("pip", "wheel", "--no-deps", "--wheel-dir", str(DIST), *package_dirs(package_names()))


@nox.session
def packaging(session: nox.Session) -> None:
    """Wheels into a fresh environment: core alone, then a third-party plugin, then a broken one."""
    session.install(*TEST_REQUIREMENTS)
    session.run("pytest", "tests/packaging", f"--timeout={TEST_TIMEOUT_S}", *session.posargs)


@nox.session
def kernels(session: nox.Session) -> None:
    """Build and install the packages with native extensions, then show which kernels load.

    ``ds report`` lists every op with the backend that runs it here and why the others
    do not, so an extension that built but cannot load shows up by name.
    """
    names = native_package_names()
    if not names:
        session.skip("no package under packages/ has a CMakeLists.txt yet")
    install_torch(session)
    # Elsewhere a package whose compiler is missing builds without its extension and
    # reports why at run time; this session exists to build the extensions, so it fails.
    session.env["DS_REQUIRE_NATIVE"] = "1"
    install_packages(session, sorted({CORE, *names}))
    session.run("ds", "report")
