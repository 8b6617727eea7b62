"""Builds the native CPU kernels (gemm.c, attention.c, elementwise.c, decoder_layer.c, abi.c) with the
system C compiler once per machine and loads them with ctypes, declaring each exported function
from its prototype in lowrank_cpu.h (the one definition of the ABI).

Why compiled C kernels and not Triton: Triton has no CPU backend (its interpreter runs numpy),
and what torch calls on CPU (oneDNN, MKL, SDPA over gathered copies) is slow at the small sizes
of decoding (see each source's header). The build takes well under a second, needs only `cc` with OpenMP (no Python or
torch headers), and is cached under `$LOWRANK_CACHE_DIR` (default `~/.cache/lowrank-engine`),
keyed by the source, the compiler, its flags and the CPU's feature flags (`-march=native`). It is
loaded after torch, so its OpenMP calls resolve to the runtime torch already loaded. No
compiler, or a failed build, is not an error: the engine warns once and serves through oneDNN.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

SOURCES = tuple(Path(__file__).with_name(name) for name in ("gemm.c", "attention.c", "elementwise.c",
                                                            "decoder_layer.c", "abi.c"))
HEADER = Path(__file__).with_name("lowrank_cpu.h")  # part of the cache key, not compiled alone
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=gnu11", "-shared", "-fPIC")
CACHE_ENV = "LOWRANK_CACHE_DIR"
DISABLE_ENV = "LOWRANK_NATIVE_CPU"  # "0" serves CPU linears through oneDNN instead

_C_TYPES = {"void": None, "int": ctypes.c_int, "int64_t": ctypes.c_int64, "float": ctypes.c_float}
_PROTOTYPE = re.compile(r"^(\w+) (lowrank_cpu_\w+)\((.*)\);$")


def _ctype(words: list[str]):
    """A C type (as words) -> its ctypes type: pointers are addresses, `const char *` a string."""
    if "*" in words:
        return ctypes.c_char_p if words[:2] == ["const", "char"] else ctypes.c_void_p
    if len(words) != 1 or words[0] not in _C_TYPES:
        raise BuildError(f"{HEADER.name}: no ctypes type for {' '.join(words)!r}")
    return _C_TYPES[words[0]]


def signatures(header: Path = HEADER) -> dict[str, tuple[list, object]]:
    """name -> (argument types, return type) of every function the header exports."""
    text = header.read_text()
    exported = text[text.index("/* exported:"):text.index("/* end exported */")].splitlines()[1:]
    found = {}
    for line in exported:
        match = _PROTOTYPE.match(line.strip())
        if match is None:
            raise BuildError(f"{header.name}: cannot read the exported prototype {line.strip()!r}")
        restype, name, params = match.groups()
        found[name] = ([_ctype(p.replace("*", " * ").split()[:-1]) for p in params.split(",")], _ctype([restype]))
    return found


class BuildError(RuntimeError):
    """The C kernel could not be compiled or loaded here."""


class CacheError(BuildError):
    """The cache folder cannot be written."""


def cache_dir() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                      "lowrank-engine")
    return Path(base)


def _cpu_flags() -> str:
    """The CPU's feature flags: `-march=native` builds differ between CPUs sharing a cache folder."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def build(compiler: str | None = None, directory: Path | None = None) -> Path:
    """Compile the kernel (or find it already compiled) -> the shared library's path. Raises BuildError."""
    compiler = compiler or os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise BuildError(f"no C compiler {compiler!r} on PATH")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"{compiler} --version failed: {e}") from e
    sources = [p.read_text() for p in (*SOURCES, HEADER)]
    key = hashlib.sha256("\0".join([*sources, compiler, version, *FLAGS, _cpu_flags()]).encode())
    directory = directory or cache_dir()
    target = directory / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=target.stem, suffix=".tmp-so", dir=directory)
        os.close(fd)
    except OSError as e:
        raise CacheError(f"cannot write to the kernel cache {directory}: {e}") from e
    try:  # compile beside the target, then rename: a crash never leaves a half-written library
        result = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", tmp, "-lm"], capture_output=True,
                                text=True, timeout=300)
        if result.returncode != 0:
            raise BuildError(f"{compiler} failed on {', '.join(p.name for p in SOURCES)}:\n{result.stderr.strip()}")
        os.chmod(tmp, 0o755)  # mkstemp made it private; others sharing the cache load it too
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"{compiler} could not build the kernels: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(path: Path) -> ctypes.CDLL:
    """The library at `path` with its functions' argument types declared."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise BuildError(f"cannot load {path}: {e}") from e
    for name, (argtypes, restype) in signatures().items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernel library, built on first use; None (after one warning) where it cannot be.

    A cache folder that cannot be written (a read-only home) falls back to the temp folder.
    """
    if os.environ.get(DISABLE_ENV, "1").strip() == "0":
        return None
    try:
        try:
            return load(build())
        except CacheError:
            return load(build(directory=Path(tempfile.gettempdir()) / f"lowrank-engine-{os.getuid()}"))
    except BuildError as e:
        warnings.warn(f"native CPU kernels unavailable, serving CPU linears through oneDNN and the rest "
                      f"through torch: {e}", RuntimeWarning, stacklevel=2)
        return None


def constant(name: str) -> int:
    """A constant of lowrank_cpu.h, a struct's size ("sizeof(type)") or a field's offset ("type.field"),
    as the loaded library has it. Raises BuildError where the library is not built or lacks the name."""
    lib = library()
    if lib is None:
        raise BuildError("the native CPU kernels are not built here")
    value = lib.lowrank_cpu_constant(name.encode())
    if value < 0:
        raise BuildError(f"the native CPU library has no constant {name!r}")
    return value
