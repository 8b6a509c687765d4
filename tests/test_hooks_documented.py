"""Every hook is part of the public contract: it has a docstring, a README entry and a test.

A hook added to ``ds.core.hookspecs`` without all three fails here, naming what is
missing. "Has a test" means some test module names the hook: a test that exercises a
hook without naming it is fine too, but then it should say which hook it covers.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ds.core import hookspecs

ROOT = Path(__file__).resolve().parents[1]
CORE_README = ROOT / "packages" / "core" / "README.md"
HOOKS = hookspecs.all_hook_names()


def test_there_are_hooks_to_check() -> None:
    assert "ds_register_optimizers" in HOOKS and len(HOOKS) >= 10, HOOKS


def readme_hooks_section() -> str:
    text = CORE_README.read_text()
    match = re.search(r"^## Hooks\n(.*?)(?=^## |\Z)", text, flags=re.MULTILINE | re.DOTALL)
    assert match, f"{CORE_README.relative_to(ROOT)} has no '## Hooks' section"
    return match.group(1)


def modules_with_tests() -> list[Path]:
    """Test modules of every package and of tests/, this one excepted (it names no hook)."""
    files = [*ROOT.glob("packages/*/tests/**/test_*.py"), *ROOT.glob("tests/**/test_*.py")]
    return [path for path in files if path.resolve() != Path(__file__).resolve()]


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_docstring(hook: str) -> None:
    doc = getattr(hookspecs, hook).__doc__ or ""
    assert len(doc.strip()) > 40, f"hook {hook} in ds/core/hookspecs.py needs a docstring stating its contract"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented_in_core_readme(hook: str) -> None:
    assert re.search(rf"`{hook}\b", readme_hooks_section()), (
        f"hook {hook} is missing from the '## Hooks' section of packages/core/README.md"
    )


def test_readme_lists_no_hook_that_does_not_exist() -> None:
    listed = set(re.findall(r"`(ds_[a-z_]+)", readme_hooks_section()))
    assert listed <= set(HOOKS), f"README lists hooks that hookspecs.py lacks: {sorted(listed - set(HOOKS))}"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_test(hook: str) -> None:
    pattern = re.compile(rf"\b{hook}\b")
    naming = [path for path in modules_with_tests() if pattern.search(path.read_text())]
    assert naming, f"no test module under packages/*/tests or tests/ names hook {hook}; add a test that exercises it"
