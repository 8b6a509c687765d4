"""Loading the native CPU optimizer extension and choosing its instruction-set path.

The extension (``ds.zero._cpu_adam``, built from ``packages/zero/csrc``) is optional: a
wheel built without a compiler, an exotic CPU or a broken install must still train, only
slower. So the module is imported on first use, never at ``import ds.zero``, and when it
is missing the optimizers fall back to an implementation in torch ops after one warning.

Operators steer the choice with environment variables, read when an optimizer is built:

* ``DS_CPU_ADAM_DISABLE_NATIVE=1`` never loads the extension (read once per process).
* ``DS_CPU_ADAM_ISA=avx512|avx2|scalar|torch`` forces a path instead of the best one the
  CPU supports; tests use it to check every path the machine has.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from dataclasses import dataclass
from types import ModuleType

from ds.core.errors import ConfigError

DISABLE_NATIVE_ENV = "DS_CPU_ADAM_DISABLE_NATIVE"
ISA_ENV = "DS_CPU_ADAM_ISA"
TORCH_PATH = "torch"
"""The portable path: the same update written in torch ops, used when the extension is absent."""

_NATIVE_MODULE = "ds.zero._cpu_adam"


@dataclass(frozen=True)
class NativeExtension:
    """The loaded extension, or why there is none."""

    module: ModuleType | None
    unavailable_reason: str

    @property
    def isas(self) -> list[str]:
        """Native paths this CPU runs, best first; empty without the extension."""
        return list(self.module.supported_isas()) if self.module is not None else []


@functools.cache
def native_extension() -> NativeExtension:
    """Import the extension once per process, recording the reason when that fails."""
    if os.environ.get(DISABLE_NATIVE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}:
        return NativeExtension(None, f"disabled by {DISABLE_NATIVE_ENV}")
    try:
        module = importlib.import_module(_NATIVE_MODULE)
    except ImportError as exc:
        return NativeExtension(None, f"{type(exc).__name__}: {exc}")
    return NativeExtension(module, "")


def available_isas() -> list[str]:
    """Every path an optimizer can be asked for on this machine, best first."""
    return [*native_extension().isas, TORCH_PATH]


_fallback_warned = False


def _warn_fallback_once(reason: str) -> None:
    global _fallback_warned
    if _fallback_warned:
        return
    _fallback_warned = True
    warnings.warn(
        f"ds-zero's native CPU optimizer extension is unavailable ({reason}); CPU Adam, "
        "AdamW and Adagrad fall back to torch ops, which are several times slower. "
        "Reinstall with `pip install --force-reinstall --no-deps ds-zero` on a machine "
        f"with a C++ compiler and CMake, or set {ISA_ENV}=torch to choose the fallback "
        "explicitly and silence this warning.",
        RuntimeWarning,
        stacklevel=3,
    )


def resolve_isa(requested: str | None = None) -> str:
    """The path an optimizer will run: ``requested``, else ``$DS_CPU_ADAM_ISA``, else the best.

    Falling back to torch because the extension is missing warns once per process; asking
    for a path this machine lacks is an error that lists the ones it has.
    """
    choice = requested or os.environ.get(ISA_ENV, "").strip().lower() or None
    extension = native_extension()
    if choice is None:
        if extension.module is None:
            _warn_fallback_once(extension.unavailable_reason)
            return TORCH_PATH
        return str(extension.module.best_isa())
    if choice not in available_isas():
        missing = f" (native extension unavailable: {extension.unavailable_reason})" \
            if extension.module is None else ""
        raise ConfigError(
            f"CPU optimizer path {choice!r} is not available on this machine{missing}. "
            f"Available: {', '.join(available_isas())}. Pass one of them as isa= or in "
            f"{ISA_ENV}, or leave both unset to use the best."
        )
    return choice


def describe() -> str:
    """One line for ``ds report``: which path CPU Adam takes here and why."""
    extension = native_extension()
    if extension.module is None:
        return f"cpu_adam: torch fallback ({extension.unavailable_reason})"
    module = extension.module
    forced = os.environ.get(ISA_ENV, "").strip().lower()
    chosen = f"{forced} (forced by {ISA_ENV})" if forced else str(module.best_isa())
    return (
        f"cpu_adam: native, runs {chosen}; this CPU supports {', '.join(extension.isas)}; "
        f"{module.max_threads()} OpenMP threads"
    )
