"""The benchmark package: its baselines compute what the oracle does, it imports only public API,
and the one peak-RSS helper sees an allocation.

``fastrlhf.bench.baselines`` is a second, user-style implementation of every op (the ``torch``
rows of ``fastrlhf bench``); here it is held to ``fastrlhf.reference`` in value and gradient.
"""

import ast
import pathlib
import sys

import pytest
import torch

from fastrlhf import reference as ref
from fastrlhf._memory import peak_rss_bytes, reset_peak_rss, rss_bytes
from fastrlhf.bench import baselines as bl

ROOT = pathlib.Path(__file__).resolve().parents[1]
B, T, V, H = 4, 6, 37, 8  # V not a power of two


def _inputs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64).float().requires_grad_()  # [B, T, V]
    labels = torch.randint(0, V, (B, T), generator=g)  # [B, T]
    with torch.no_grad():
        logp = ref.token_logprobs(logits, labels)
    old = logp + 0.3 * torch.randn(B, T, generator=g)  # ratios both inside and outside the clip range
    refl = logp + 0.3 * torch.randn(B, T, generator=g)
    adv, adv_tok = torch.randn(B, generator=g), torch.randn(B, T, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, -2:] = False
    dpo_labels = labels.clone()
    dpo_labels[:, :2] = -100  # prompt tokens
    ref_c, ref_r = torch.randn(B // 2, generator=g), torch.randn(B // 2, generator=g)
    hidden = torch.randn(B, T, H, generator=g).requires_grad_()  # [B, T, H]
    weight = torch.randn(V, H, generator=g).requires_grad_()  # [V, H]
    return locals()


PAIRS = {  # name: (baseline, oracle), each (inputs) -> tensor or tuple
    "token_logprobs": (lambda x: bl.token_logprobs(x["logits"], x["labels"]),
                       lambda x: ref.token_logprobs(x["logits"], x["labels"])),
    "entropy": (lambda x: bl.entropy(x["logits"]), lambda x: ref.entropy(x["logits"])),
    "token_logprobs_and_entropy": (lambda x: bl.token_logprobs_and_entropy(x["logits"], x["labels"]),
                                   lambda x: ref.token_logprobs_and_entropy(x["logits"], x["labels"])),
    "ppo_clip_loss": (
        lambda x: bl.ppo_clip_loss(x["logits"], x["labels"], x["old"], x["adv_tok"], x["mask"], clip=0.2),
        lambda x: ref.ppo_clip_loss(x["logits"], x["labels"], x["old"], x["adv_tok"], mask=x["mask"],
                                    clip_low=0.2, loss_agg="token-mean")[0]),
    "grpo_loss": (
        lambda x: bl.grpo_loss(x["logits"], x["labels"], x["old"], x["adv"], x["refl"], x["mask"], beta=0.04),
        lambda x: ref.grpo_loss(x["logits"], x["labels"], x["old"], x["adv"], x["refl"], beta=0.04,
                                mask=x["mask"], loss_agg="token-mean")[0]),
    "dpo_loss": (lambda x: bl.dpo_loss(x["logits"], x["dpo_labels"], x["ref_c"], x["ref_r"], beta=0.1),
                 lambda x: ref.dpo_loss(x["logits"], x["dpo_labels"], x["ref_c"], x["ref_r"], beta=0.1)[0]),
    "linear_token_logprobs": (lambda x: bl.linear_token_logprobs(x["hidden"], x["weight"], x["labels"]),
                              lambda x: ref.linear_token_logprobs(x["hidden"], x["weight"], x["labels"])),
    "linear_grpo_loss": (
        lambda x: bl.linear_grpo_loss(x["hidden"], x["weight"], x["labels"], x["old"], x["adv"], x["refl"],
                                      x["mask"]),
        lambda x: ref.linear_grpo_loss(x["hidden"], x["weight"], x["labels"], x["old"], x["adv"], x["refl"],
                                       mask=x["mask"])[0]),
    "linear_dpo_loss": (
        lambda x: bl.linear_dpo_loss(x["hidden"], x["weight"], x["dpo_labels"], x["ref_c"], x["ref_r"]),
        lambda x: ref.linear_dpo_loss(x["hidden"], x["weight"], x["dpo_labels"], x["ref_c"], x["ref_r"])[0]),
}


def _flat(out):
    return torch.cat([o.reshape(-1) for o in out]) if isinstance(out, tuple) else out.reshape(-1)


@pytest.mark.parametrize("name", PAIRS)
def test_baseline_matches_reference_value_and_gradient(name):
    x = _inputs()
    leaves = [x["hidden"], x["weight"]] if name.startswith("linear") else [x["logits"]]
    baseline, oracle = PAIRS[name]
    got, want = _flat(baseline(x)), _flat(oracle(x))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    up = torch.randn(got.shape, generator=torch.Generator().manual_seed(1))  # random upstream gradient
    g_got = torch.autograd.grad((got * up).sum(), leaves)
    g_want = torch.autograd.grad((want * up).sum(), leaves)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_ppo_baseline_clips():
    """Hand case: A = 1, ratio e^0.5 > 1.2 is clipped to 1.2 -> loss -1.2; ratio 1 -> -1; mean -1.1."""
    logp = torch.tensor([[0.5, 0.0]])
    loss = bl.ppo_loss_from_logprobs(logp, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool))
    assert loss.item() == pytest.approx(-1.1)


def test_gae_baseline_matches_reference_on_right_padded_rows():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(5, 9, generator=g), torch.randn(5, 9, generator=g)
    mask = torch.arange(9).unsqueeze(0) < torch.tensor([[9], [5], [1], [7], [3]])  # [5, 9]
    adv, ret = bl.gae(rewards, values, mask, gamma=0.99, lam=0.95)
    adv_ref, ret_ref = ref.gae(rewards, values, mask, gamma=0.99, lam=0.95)
    torch.testing.assert_close(adv, adv_ref)
    torch.testing.assert_close(ret, ret_ref)


def _fastrlhf_imports(path: pathlib.Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods.add(node.module)
            mods.update(f"{node.module}.{a.name}" for a in node.names if node.module == "fastrlhf")
    return {m for m in mods if m.split(".")[0] == "fastrlhf"}


def test_bench_uses_only_public_api():
    """The bench calls ops as users do: ``fastrlhf.<op>``; never the oracle or the kernels' modules."""
    allowed = {"fastrlhf", "fastrlhf._backend", "fastrlhf._memory"}
    files = sorted((ROOT / "fastrlhf" / "bench").glob("*.py"))
    assert len(files) >= 5
    for path in files:
        bad = {m for m in _fastrlhf_imports(path) if m not in allowed and not m.startswith("fastrlhf.bench")}
        assert not bad, f"{path.name} imports private modules {bad}"


def test_algos_do_not_import_bench():
    for path in sorted((ROOT / "fastrlhf" / "algos").glob("*.py")):
        assert not any(m.startswith("fastrlhf.bench") for m in _fastrlhf_imports(path)), path.name


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM / clear_refs are Linux")
def test_peak_rss_sees_an_allocation_after_reset():
    before = rss_bytes()
    assert reset_peak_rss()
    assert peak_rss_bytes() - before < 16 * 2**20  # the mark moved down to about the current RSS
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    grown = peak_rss_bytes() - before
    del x
    assert grown >= 60 * 2**20
