"""Finding, loading and describing the compiled extension ``_C``, without ever failing an import.

Shared by ds-kernels-cuda and ds-kernels-rocm (the ROCm package links this file): a
:class:`NativeLibrary` names the package whose ``_C`` it loads and the torch runtime it
needs. ``problem()`` answers cheaply (no import of the extension) whether this process
could use it at all; ``load()`` imports it once, on first real use, and remembers a
failure with a diagnostic, in the manner of bitsandbytes' ``cextension.py``.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
from dataclasses import dataclass, field
from types import ModuleType

import torch

DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
"""The dtype codes of csrc/dtypes.h."""


class NativeUnavailableError(RuntimeError):
    """The extension cannot run here; the message says why and how to fix it."""


def dtype_code(dtype: torch.dtype) -> int:
    return DTYPE_CODES[dtype]


@dataclass
class NativeLibrary:
    """The ``_C`` extension of one kernel package and the runtime it was built for.

    ``runtime`` is ``"cuda"`` or ``"hip"``: the attribute of ``torch.version`` that must be
    set for the extension to share torch's GPU runtime.
    """

    package: str
    runtime: str
    build_hint: str
    _module: ModuleType | None = field(default=None, repr=False)
    _error: str | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def module_name(self) -> str:
        return f"{self.package}._C"

    def problem(self, device_type: str) -> str | None:
        """Why the extension cannot run on ``device_type`` here, or None if it may."""
        if device_type != "cuda":
            return f"runs on torch's 'cuda' devices only, not {device_type!r}"
        if getattr(torch.version, self.runtime, None) is None:
            other = "ROCm/HIP" if self.runtime == "cuda" else "CUDA"
            return (f"this torch ({torch.__version__}) is not built for {self.runtime.upper()} "
                    f"(it is a CPU or {other} build)")
        if self._error is not None:
            return self._error
        if self._module is None and importlib.util.find_spec(self.module_name) is None:
            return f"the compiled extension {self.module_name} is not installed; {self.build_hint}"
        if not torch.cuda.is_available():
            return "torch sees no GPU in this process"
        return None

    def load(self) -> ModuleType:
        """Import the extension once; raise :class:`NativeUnavailableError` with the reason."""
        with self._lock:
            if self._module is not None:
                return self._module
            if self._error is not None:
                raise NativeUnavailableError(self._error)
            try:
                module = importlib.import_module(self.module_name)
                _check_architecture(module.build_info())
            except Exception as exc:
                self._error = f"loading {self.module_name} failed: {type(exc).__name__}: {exc}; {self.build_hint}"
                raise NativeUnavailableError(self._error) from exc
            self._module = module
            return module

    def build_info(self) -> dict[str, str] | None:
        """What the extension was built for, if it is loaded."""
        return None if self._module is None else dict(self._module.build_info())

    def report_line(self) -> str:
        """The extension's line in ``ds report``: why it cannot run, or what it was built for.

        Both kernel packages (CUDA and ROCm) report the same way; ROCm's torch exposes its
        GPUs as ``cuda`` devices too, so availability is asked for that device type.
        """
        problem = self.problem("cuda")
        if problem is not None:
            return f"{self.module_name}: unavailable ({problem})"
        info = self.build_info()
        if info is None:
            return f"{self.module_name}: installed, loaded on first use"
        return f"{self.module_name}: built for {info['architectures']} by {info['compiler']}"


def covers(architectures: str, capability: tuple[int, int]) -> bool:
    """Whether a build for ``architectures`` has code a GPU of ``capability`` can run.

    Targets use CMake's syntax: ``80-real`` is machine code for 8.x with x >= 0,
    ``90a-real`` machine code for exactly 9.0, ``90-virtual`` PTX that any newer GPU
    compiles, and a bare ``80`` both machine code and PTX.
    """
    device = capability[0] * 10 + capability[1]
    for target in filter(None, architectures.split(";")):
        number, _, kind = target.partition("-")
        specific = number.endswith(("a", "f"))
        arch = int(number.rstrip("af"))
        if kind in ("virtual", "") and not specific and device >= arch:
            return True
        if kind in ("real", "") and (device == arch or (not specific and device // 10 == arch // 10 and device > arch)):
            return True
    return False


def _check_architecture(info: dict[str, str]) -> None:
    """Fail at load, with the fix, when the GPU is one the extension has no code for."""
    if info.get("platform") != "cuda":
        return
    capability = torch.cuda.get_device_capability()
    if not covers(str(info.get("architectures", "")), capability):
        major, minor = capability
        raise NativeUnavailableError(
            f"the GPU has compute capability {major}.{minor} but the extension was built for "
            f"{info.get('architectures')}; rebuild with DS_CUDA_ARCHS={major}{minor}-real"
        )
