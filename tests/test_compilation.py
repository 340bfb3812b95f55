"""compilation.py: where the cache goes, and which XLA options win."""

import os

import jax
import pytest

from cat_jax import compilation


def test_resolve_reads_the_setting_then_our_variable_then_jax_s(
    monkeypatch, tmp_path):
  for v in (compilation.ENV, "JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME"):
    monkeypatch.delenv(v, raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))
  assert compilation.resolve("auto") == os.path.join(
      str(tmp_path), ".cache", "cat_jax", "xla")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
  assert compilation.resolve() == str(tmp_path / "x" / "cat_jax" / "xla")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "j"))
  assert compilation.resolve() == str(tmp_path / "j")
  monkeypatch.setenv(compilation.ENV, str(tmp_path / "c"))
  assert compilation.resolve() == str(tmp_path / "c")
  monkeypatch.setenv(compilation.ENV, "off")
  assert compilation.resolve() is None
  assert compilation.resolve(str(tmp_path / "d")) == str(tmp_path / "d")
  for off in ("off", "None", "0", "false"):
    assert compilation.resolve(off) is None


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU options")
def test_an_option_in_xla_flags_wins_over_ours(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert compilation.compiler_options() == compilation.CPU_COMPILER_OPTIONS
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                     "--xla_backend_optimization_level=0")
  left = compilation.compiler_options()
  assert "xla_backend_optimization_level" not in left
  assert left == {k: v for k, v in compilation.CPU_COMPILER_OPTIONS.items()
                  if k != "xla_backend_optimization_level"}
  monkeypatch.setenv("XLA_FLAGS", " ".join(
      f"--{k}={v}" for k, v in compilation.CPU_COMPILER_OPTIONS.items()))
  assert compilation.compiler_options() is None
