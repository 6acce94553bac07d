"""Max error of every loss vs the fp64 reference, per backend (the numbers quoted in the README and docs).

    python benchmarks/fidelity.py

Shapes are those of tests/test_losses.py (B=3, T=6, V=257 fp32 for PPO/GRPO over six option
sets x three seeds; [4, 7, 129] for DPO; [8, 64] for GAE). Prints, per (op, backend), the max
absolute error of the loss and of the logits' gradient. The Triton backend runs under the
interpreter on a machine without CUDA.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import fastrlhf  # noqa: E402, I001
from fastrlhf import reference as R  # noqa: E402
from test_losses import PPO_OPTIONS, _ppo_batch  # noqa: E402  (the test batches, one source)


def _up(t):
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _errors(op, backend, x, *args, **kwargs):
    """``(|loss - loss64|, max |dlogits - dlogits64|)`` of ``fastrlhf.<op>`` vs ``reference.<op>``."""
    x = x.detach().requires_grad_()
    loss, _ = getattr(fastrlhf, op)(x, *args, backend=backend, **kwargs)
    (g,) = torch.autograd.grad(loss, x)
    x64 = x.detach().double().requires_grad_()
    loss64, _ = getattr(R, op)(x64, *map(_up, args), **{k: _up(v) for k, v in kwargs.items()})
    (g64,) = torch.autograd.grad(loss64, x64)
    return abs(loss.item() - loss64.item()), (g.double() - g64).abs().max().item()


def main():
    res = {}

    def upd(key, errs):
        old = res.get(key, (0.0, 0.0))
        res[key] = (max(old[0], errs[0]), max(old[1], errs[1]))

    backends = [b for b, ok in fastrlhf.available_backends().items() if ok]
    for backend in backends:
        for opts in PPO_OPTIONS:
            for seed in range(3):
                x, labels, mask, old, ref, adv = _ppo_batch("cpu", seed=seed)
                upd(("ppo_clip_loss", backend),
                    _errors("ppo_clip_loss", backend, x, labels, old, adv, mask=mask, ref_logprobs=ref, **opts))
        x, labels, mask, old, ref, adv = _ppo_batch("cpu", per_sequence=True)
        upd(("grpo_loss", backend), _errors("grpo_loss", backend, x, labels, old, adv, ref, mask=mask))
        for loss_type, eps in [("sigmoid", 0.0), ("sigmoid", 0.1), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.1)]:
            g = torch.Generator().manual_seed(3)
            x = torch.randn(4, 7, 129, generator=g) * 2
            labels = torch.randint(0, 129, (4, 7), generator=g)
            labels[:, :2] = -100
            rc, rr = -torch.rand(2, generator=g) * 30, -torch.rand(2, generator=g) * 30
            upd((f"dpo_loss[{loss_type}]", backend),
                _errors("dpo_loss", backend, x, labels, rc, rr, beta=0.2, loss_type=loss_type, label_smoothing=eps))
        g = torch.Generator().manual_seed(0)
        r, v = torch.randn(8, 64, generator=g), torch.randn(8, 64, generator=g)
        m = torch.rand(8, 64, generator=g) > 0.3
        adv_, _ = fastrlhf.gae(r, v, m, gamma=0.99, lam=0.95, backend=backend)
        adv64, _ = R.gae(r.double(), v.double(), m, gamma=0.99, lam=0.95)
        upd(("gae (advantages)", backend), ((adv_.double() - adv64).abs().max().item(), 0.0))
    print(f"{'op':22s} {'backend':8s} {'loss err':>9s} {'grad err':>9s}")
    for (op, backend), (le, ge) in sorted(res.items()):
        print(f"{op:22s} {backend:8s} {le:9.1e} {ge:9.1e}")


if __name__ == "__main__":
    main()
