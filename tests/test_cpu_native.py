"""Building and loading the native CPU kernel (kernels.cpu.build): cached, atomic, clear when it cannot."""

import ctypes
import os
import re
import shutil
import stat
import warnings

import pytest

from kernels.cpu import build as cpu_native

COMPILER = os.environ.get("CC") or "cc"
needs_compiler = pytest.mark.skipif(shutil.which(COMPILER) is None, reason="no C compiler")


@needs_compiler
def test_build_compiles_once_then_reuses_the_cached_library(tmp_path):
    first = cpu_native.build(directory=tmp_path)
    assert first.parent == tmp_path and first.suffix == ".so"
    built_at = first.stat().st_mtime_ns
    assert cpu_native.build(directory=tmp_path) == first and first.stat().st_mtime_ns == built_at
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind
    lib = cpu_native.load(first)
    assert all(hasattr(lib, name) for name in cpu_native.signatures())


def _fake_compiler(tmp_path, script: str):
    path = tmp_path / "fake-cc"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_a_failing_compiler_raises_with_its_message_and_leaves_nothing(tmp_path):
    cc = _fake_compiler(tmp_path, 'case "$1" in --version) echo fake 1.0;; *) echo "no vector types" >&2; exit 1;; esac\n')
    out = tmp_path / "cache"
    with pytest.raises(cpu_native.BuildError, match="no vector types"):
        cpu_native.build(compiler=cc, directory=out)
    assert list(out.iterdir()) == []


@needs_compiler
def test_an_unwritable_cache_raises_a_build_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would go")
    with pytest.raises(cpu_native.BuildError, match="kernel cache"):
        cpu_native.build(directory=blocker / "cache")


@needs_compiler
def test_an_unwritable_cache_falls_back_to_the_temp_folder(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.delenv(cpu_native.DISABLE_ENV, raising=False)
    monkeypatch.setenv(cpu_native.CACHE_ENV, str(blocker / "cache"))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    cpu_native.library.cache_clear()
    try:
        assert cpu_native.library() is not None
        assert any((tmp_path / "tmp").glob("lowrank-engine-*/cpu_kernels-*.so"))
    finally:
        cpu_native.library.cache_clear()


@needs_compiler
def test_the_built_library_is_readable_by_everyone(tmp_path):
    assert cpu_native.build(directory=tmp_path).stat().st_mode & 0o555 == 0o555


def test_a_missing_compiler_raises(tmp_path):
    with pytest.raises(cpu_native.BuildError, match="no C compiler"):
        cpu_native.build(compiler="definitely-not-a-compiler", directory=tmp_path)


def test_a_library_that_does_not_load_raises(tmp_path):
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"not an ELF file")
    with pytest.raises(cpu_native.BuildError, match="cannot load"):
        cpu_native.load(junk)


def test_library_warns_once_and_returns_none_when_the_build_fails(tmp_path, monkeypatch):
    monkeypatch.delenv(cpu_native.DISABLE_ENV, raising=False)
    monkeypatch.setenv("CC", "definitely-not-a-compiler")
    monkeypatch.setenv(cpu_native.CACHE_ENV, str(tmp_path))
    cpu_native.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="oneDNN"):
            assert cpu_native.library() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert cpu_native.library() is None  # cached: no second warning
    finally:
        cpu_native.library.cache_clear()


def test_the_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(cpu_native.CACHE_ENV, str(tmp_path / "here"))
    assert cpu_native.cache_dir() == tmp_path / "here"
    monkeypatch.delenv(cpu_native.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cpu_native.cache_dir() == tmp_path / "xdg" / "lowrank-engine"


def test_the_header_declares_every_exported_function_and_python_reads_them_all():
    """lowrank_cpu.h is the one definition: every `lowrank_cpu_*` the sources define is declared there."""
    defined = set()
    for source in cpu_native.SOURCES:
        defined |= set(re.findall(r"^\w+ (lowrank_cpu_\w+)\(", source.read_text(), re.M))
    assert defined == set(cpu_native.signatures())


@needs_compiler
def test_pythons_view_of_the_abi_agrees_with_the_library():
    from kernels.cpu.decoder_layer import LayerDescription, LinearDescription, layout_mismatches

    if cpu_native.library() is None:
        pytest.skip(f"{cpu_native.DISABLE_ENV}=0 turns the native kernels off")
    assert layout_mismatches() == []
    assert cpu_native.constant("sizeof(cpu_decoder_layer)") == ctypes.sizeof(LayerDescription)
    assert cpu_native.constant("sizeof(cpu_linear)") == ctypes.sizeof(LinearDescription)
    assert cpu_native.constant("PANEL") > 0
    assert cpu_native.constant("HEAD_DIM_MULTIPLE") % cpu_native.constant("LANES") == 0
    with pytest.raises(cpu_native.BuildError, match="no constant 'NO_SUCH'"):
        cpu_native.constant("NO_SUCH")


@needs_compiler
def test_a_struct_mirror_that_drifts_from_the_header_is_named(monkeypatch):
    from kernels.cpu import decoder_layer

    if cpu_native.library() is None:
        pytest.skip(f"{cpu_native.DISABLE_ENV}=0 turns the native kernels off")

    fields = list(decoder_layer.LayerDescription._fields_)
    a, b = fields.index(("input_norm", ctypes.c_void_p)), fields.index(("post_norm", ctypes.c_void_p))
    fields[a], fields[b] = fields[b], fields[a]  # the two norms' pointers in the wrong order
    fields.append(("extra", ctypes.c_int64))  # and a field the header does not have

    class Drifted(ctypes.Structure):
        _fields_ = fields

    monkeypatch.setattr(decoder_layer, "LayerDescription", Drifted)
    found = decoder_layer.layout_mismatches()
    assert any(m.startswith("cpu_decoder_layer.input_norm: offset") for m in found)
    assert any(m.startswith("sizeof(cpu_decoder_layer)") for m in found)

