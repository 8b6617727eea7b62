"""The native CPU kernels built for aarch64 and run in an emulator, for tests/test_cpu_neon.py.

`build` cross-compiles kernels/cpu/*.c with zig's clang (PyPI `ziglang`), or with GCC where Debian's
cross compiler is installed, into a static aarch64 executable, linked with tests/aarch64_libc.c in
place of a C library. `Machine` loads it into
unicorn's ARM64 emulator (PyPI `unicorn`, a Cortex-A72: ARMv8.0 with NEON) and calls the exported
functions by the AAPCS64 convention, each argument placed by its type in the prototypes of
lowrank_cpu.h (kernels.cpu.build.signatures). Tensors are copied into an emulated heap, each
buffer followed by a guard that every call checks, so a kernel writing past its output fails the
test instead of passing unseen.
"""

from __future__ import annotations

import ctypes
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import torch
import unicorn
from unicorn import arm64_const as arm64

from kernels.cpu import build as cpu_native

LIBC = Path(__file__).with_name("aarch64_libc.c")
TARGET = ("-target", "aarch64-linux-musl", "-mcpu=baseline")  # musl's headers; nothing of musl is linked
# build.FLAGS' optimisation and dialect; -fopenmp-simd keeps the `omp simd` loops as -fopenmp compiles
# them and ignores the parallel regions (one thread, no runtime); no -march: the ISA is the target's.
FLAGS = (*(f for f in cpu_native.FLAGS if f.startswith(("-O", "-std="))), "-fopenmp-simd", "-fno-stack-protector",
         "-Wall")
LIBC_FLAGS = ("-O2", "-ffreestanding", "-fno-stack-protector")
GCC = "aarch64-linux-gnu-gcc"  # Debian's gcc-aarch64-linux-gnu: the compiler an ARM Linux host's `cc` is

PAGE = 4096
STACK, STACK_BYTES = 0x4000_0000, 4 << 20  # the attention kernel keeps ~70 KiB of arrays on its stack
HEAP, HEAP_BYTES = 0x5000_0000, 64 << 20
RETURN = 0x3000_0000  # the link register's sentinel: emulation stops when a call returns here
GUARD = b"\xa5" * 64  # after every heap buffer; a call that changes one wrote past its buffer
TIMEOUT_US = 60_000_000  # a call still running after a minute is hung (a whole test takes under a second)


class EmulatorError(RuntimeError):
    """The emulated kernel faulted, did not return, or wrote past a buffer."""


def _run(command: list[str], directory: Path) -> str:
    """Runs a compiler -> its stderr (the warnings); raises EmulatorError when it fails. zig's caches go to
    `directory` (the home folder may be read-only)."""
    cache = {name: str(directory / "zig-cache") for name in ("ZIG_GLOBAL_CACHE_DIR", "ZIG_LOCAL_CACHE_DIR")}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, **cache})
    if result.returncode != 0:
        raise EmulatorError(f"{' '.join(command)} failed:\n{result.stderr.strip()}")
    return result.stderr


def _zig_cc(*args: str) -> list[str]:
    return [sys.executable, "-m", "ziglang", "cc", *TARGET, *args]


def _gcc(*args: str) -> list[str]:
    """GCC on musl's headers as zig ships them (Debian's cross compiler comes without a C library's)."""
    import ziglang

    headers = Path(ziglang.__file__).parent / "lib" / "libc" / "include"
    own = subprocess.run([GCC, "-print-file-name=include"], capture_output=True, text=True).stdout.strip()
    include = ["-nostdinc", "-isystem", own]
    for name in ("aarch64-linux-musl", "generic-musl", "aarch64-linux-any", "any-linux-any"):
        include += ["-isystem", str(headers / name)]
    return [GCC, "-mcpu=generic", *include, *args]


def build(directory: Path, compiler: str = "clang") -> tuple[Path, str]:
    """Compile the kernels for aarch64 with zig's clang or with GCC (`compiler`), and link them with the
    libc stand-in (zig's lld) into `directory` -> (executable, compiler warnings)."""
    kernel_cc = {"clang": _zig_cc, "gcc": _gcc}[compiler]
    warnings = []
    objects = [directory / "libc.o"]
    _run(_zig_cc(*LIBC_FLAGS, "-c", str(LIBC), "-o", str(objects[0])), directory)
    for source in cpu_native.SOURCES:
        objects.append(directory / f"{source.stem}.o")
        warnings.append(_run(kernel_cc(*FLAGS, "-c", str(source), "-o", str(objects[-1])), directory))
    executable = directory / "kernels-aarch64.elf"
    _run(_zig_cc("-nostdlib", "-static", *map(str, objects), "-o", str(executable)), directory)
    return executable, "".join(warnings)


def _elf(image: bytes) -> tuple[list[tuple[int, int, bytes]], dict[str, int]]:
    """A static ELF64 executable -> (its loadable segments as (address, size in memory, file bytes),
    its function symbols' addresses)."""
    if image[:4] != b"\x7fELF" or image[4] != 2 or struct.unpack_from("<HH", image, 0x10) != (2, 183):
        raise EmulatorError("not a position-dependent aarch64 ELF64 executable (ET_EXEC, EM_AARCH64): its "
                            "addresses would need relocating")
    phoff, shoff = struct.unpack_from("<QQ", image, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", image, 0x36)
    segments = []
    for i in range(phnum):
        kind, _, offset, vaddr, _, filesz, memsz, _ = struct.unpack_from("<IIQQQQQQ", image, phoff + i * phentsize)
        if kind == 1:  # PT_LOAD
            segments.append((vaddr, memsz, image[offset:offset + filesz]))
    sections = [struct.unpack_from("<IIQQQQIIQQ", image, shoff + i * shentsize) for i in range(shnum)]
    symbols = {}
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind != 2:  # SHT_SYMTAB
            continue
        names = sections[link][4]
        for at in range(offset, offset + size, entsize):
            name, info, _, _, value, _ = struct.unpack_from("<IBBHQQ", image, at)
            if info & 0xF == 2:  # STT_FUNC
                symbols[image[names + name:image.index(b"\0", names + name)].decode()] = value
    return segments, symbols


def _parameter_names() -> dict[str, list[str]]:
    """Exported function -> its parameters' names, from the prototypes build.signatures reads."""
    text = cpu_native.HEADER.read_text()
    names = {}
    for line in text[text.index("/* exported:"):text.index("/* end exported */")].splitlines()[1:]:
        _, name, params = cpu_native._PROTOTYPE.match(line.strip()).groups()
        names[name] = [param.replace("*", " ").split()[-1] for param in params.split(",")]
    return names


class Machine:
    """The aarch64 kernel executable loaded in an emulated CPU; `machine.lowrank_cpu_x(...)` calls
    it with integer (pointers as heap addresses, None for NULL), float and bytes (a C string)
    arguments, positional or named as in lowrank_cpu.h."""

    def __init__(self, executable: Path):
        segments, self.symbols = _elf(executable.read_bytes())
        self.uc = unicorn.Uc(unicorn.UC_ARCH_ARM64, unicorn.UC_MODE_ARM)
        self.uc.ctl_set_cpu_model(arm64.UC_CPU_ARM64_A72)
        start = min(address for address, _, _ in segments) // PAGE * PAGE  # one region: segments may share a page
        self.uc.mem_map(start, -(-(max(address + size for address, size, _ in segments) - start) // PAGE) * PAGE)
        for address, _, data in segments:
            self.uc.mem_write(address, data)  # the rest (.bss) is mapped as zeros
        self.uc.mem_map(STACK, STACK_BYTES)
        self.uc.mem_map(HEAP, HEAP_BYTES)
        self.uc.mem_map(RETURN, PAGE)
        self.uc.reg_write(arm64.UC_ARM64_REG_CPACR_EL1, 0x300000)  # FPEN = 0b11: FP and NEON do not trap
        self.signatures, self.parameters = cpu_native.signatures(), _parameter_names()
        self.reset()

    def reset(self) -> None:
        """Free every heap buffer."""
        self.top, self.guards = HEAP, []

    def alloc(self, size: int) -> int:
        """A heap buffer of `size` bytes (64-byte aligned, filled with NaN-like 0xff bytes) -> its address."""
        address, self.top = self.top, self.top + -(-(size + len(GUARD)) // 64) * 64
        if self.top > HEAP + HEAP_BYTES:
            raise EmulatorError(f"the emulated heap of {HEAP_BYTES >> 20} MiB cannot hold {size} more bytes")
        self.uc.mem_write(address, b"\xff" * size + GUARD)
        self.guards.append(address + size)
        return address

    def put(self, data: torch.Tensor | bytes | ctypes.Structure) -> int:
        """A copy of a tensor (its elements in order), bytes or a ctypes structure on the heap -> its address."""
        if isinstance(data, torch.Tensor):
            data = data.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        data = bytes(data)
        address = self.alloc(len(data))
        self.uc.mem_write(address, data)
        return address

    def get(self, address: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor of `shape` and `dtype` stored at `address`."""
        raw = bytearray(self.uc.mem_read(address, math.prod(shape) * dtype.itemsize))
        return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).view(shape).clone()

    def __getattr__(self, name: str):
        if name.startswith("lowrank_cpu_") and name in self.__dict__.get("signatures", {}):
            return lambda *args, **named: self.call(name, *args, **named)
        raise AttributeError(name)

    def call(self, name: str, *args, **named):
        """Calls the exported function `name` -> its return value (None for void)."""
        argtypes, restype = self.signatures[name]
        params = self.parameters[name]
        unknown = set(named) - set(params[len(args):])
        missing = [p for p in params[len(args):] if p not in named]
        if len(args) > len(params) or unknown or missing:
            raise TypeError(f"{name}({', '.join(params)}) called with {len(args)} positional arguments"
                            f"{', unknown ' + ', '.join(sorted(unknown)) if unknown else ''}"
                            f"{', without ' + ', '.join(missing) if missing else ''}")
        args = (*args, *(named[p] for p in params[len(args):]))
        integers, floats, stacked = [], [], []
        for value, kind in zip(args, argtypes):
            if kind is ctypes.c_char_p:
                value = self.put(bytes(value) + b"\0")
            if kind is ctypes.c_float:
                bits = struct.unpack("<I", struct.pack("<f", value))[0]
                (floats if len(floats) < 8 else stacked).append(bits)
            else:  # pointers, int64_t and int: one 64-bit register or stack slot each (AAPCS64)
                bits = (value or 0) & (1 << 64) - 1
                (integers if len(integers) < 8 else stacked).append(bits)
        for i, bits in enumerate(integers):
            self.uc.reg_write(arm64.UC_ARM64_REG_X0 + i, bits)
        for i, bits in enumerate(floats):
            self.uc.reg_write(arm64.UC_ARM64_REG_S0 + i, bits)
        sp = STACK + STACK_BYTES - 64 - 16 * len(stacked)
        self.uc.mem_write(sp, b"".join(struct.pack("<Q", bits) for bits in stacked))
        self.uc.reg_write(arm64.UC_ARM64_REG_SP, sp)
        self.uc.reg_write(arm64.UC_ARM64_REG_LR, RETURN)
        try:
            self.uc.emu_start(self.symbols[name], RETURN, timeout=TIMEOUT_US)
        except unicorn.UcError as e:
            pc = self.uc.reg_read(arm64.UC_ARM64_REG_PC)
            raise EmulatorError(f"{name} faulted at pc {pc:#x} ({self._function_at(pc)}): {e}") from e
        if (pc := self.uc.reg_read(arm64.UC_ARM64_REG_PC)) != RETURN:
            raise EmulatorError(f"{name} did not return within {TIMEOUT_US // 10**6} s (pc {pc:#x})")
        for end in self.guards:
            if bytes(self.uc.mem_read(end, len(GUARD))) != GUARD:
                raise EmulatorError(f"{name} wrote past the heap buffer ending at {end:#x}")
        x0 = self.uc.reg_read(arm64.UC_ARM64_REG_X0)
        if restype is ctypes.c_int:
            return (x0 & 0xFFFFFFFF) - ((x0 & 0x80000000) << 1)
        if restype is ctypes.c_int64:
            return x0 - ((x0 & 1 << 63) << 1)
        return None

    def _function_at(self, pc: int) -> str:
        below = [(address, name) for name, address in self.symbols.items() if address <= pc]
        return max(below)[1] if below else "?"
