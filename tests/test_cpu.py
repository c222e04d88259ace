"""What the CPU computes natively, and the bf16 autocast that follows from it."""

from __future__ import annotations

import torch

from pallava import cpu


def test_cpu_flags_name_bf16_support(tmp_path):
    with_bf16, without, empty = (tmp_path / name for name in ("bf16", "plain", "empty"))
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2\n")
    empty.write_text("")
    assert cpu.cpu_computes_bf16(with_bf16)
    assert not cpu.cpu_computes_bf16(without)
    assert not cpu.cpu_computes_bf16(empty)
    assert not cpu.cpu_computes_bf16(tmp_path / "missing")


def _autocast_inside(device) -> torch.dtype | None:
    with cpu.native_bf16_autocast(device):
        return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None


def test_native_bf16_autocast_only_on_a_bf16_cpu_and_never_over_the_callers_own(monkeypatch):
    monkeypatch.setattr(cpu, "this_cpu_computes_bf16", lambda: True)
    assert _autocast_inside("cpu") == torch.bfloat16
    assert _autocast_inside(torch.device("cpu")) == torch.bfloat16
    assert _autocast_inside("meta") is None  # not a CPU: untouched
    with torch.autocast("cpu", torch.float16):  # the caller's choice stands
        assert _autocast_inside("cpu") == torch.float16
    monkeypatch.setattr(cpu, "this_cpu_computes_bf16", lambda: False)
    assert _autocast_inside("cpu") is None
