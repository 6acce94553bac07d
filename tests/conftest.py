"""Shared test set-up: the Triton interpreter on machines without CUDA, backends, tolerances."""

import importlib
import os
import sys
import textwrap

import pytest
import torch

# The Triton interpreter must be chosen before any kernel is decorated (fastrlhf._backend
# does the same; set here too so that importing fastrlhf.kernels directly in a test works).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastrlhf  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def backends():
    """Every backend runnable here: triton (interpreted on CPU), native (when built), torch."""
    avail = fastrlhf.available_backends()
    out = [b for b in ("triton", "native", "torch") if avail[b]]
    if os.environ.get("FASTRLHF_REQUIRE_TRITON") == "1":
        assert "triton" in out, "FASTRLHF_REQUIRE_TRITON=1 but the triton backend is unavailable"
    return out


def device_for(backend):
    return "cuda" if (HAS_CUDA and backend == "triton") else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def assert_grad_close(ours, ref64, dtype, atol32=1e-5, rtol32=1e-4):
    """fp32: |ours - ref| <= atol + rtol |ref|. bf16/fp16 gradients are stored in that dtype:
    the error may be at most twice the error of rounding the exact gradient to it (+ tiny atol)."""
    ours = ours.double()
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(ours, ref64, atol=atol32, rtol=rtol32)
        return
    own = (ref64.to(dtype).double() - ref64).abs().max().item()
    err = (ours - ref64).abs().max().item()
    assert err <= 2 * own + 1e-6, f"{dtype} grad error {err:.3g} > 2 x rounding error {own:.3g}"


@pytest.fixture
def standin(tmp_path, monkeypatch):
    """Stand-in package trees for the integrations' patch() tests: writes a package tree under
    tmp_path and imports it; removes it from sys.modules afterwards."""
    made = []

    def build(pkg, files):
        for rel, text in files.items():
            path = tmp_path / pkg / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text))
        for d in [p for p in (tmp_path / pkg).rglob("*") if p.is_dir()] + [tmp_path / pkg]:
            (d / "__init__.py").touch()
        monkeypatch.syspath_prepend(str(tmp_path))
        importlib.invalidate_caches()
        made.append(pkg)
        return importlib.import_module(pkg)

    yield build
    for name in list(sys.modules):
        if any(name == p or name.startswith(p + ".") for p in made):
            del sys.modules[name]
