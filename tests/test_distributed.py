"""Vocab-parallel logits over torch.distributed (gloo, 2-3 CPU processes) vs the single-process result."""

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

B, T, V = 2, 5, 103  # V not divisible by the world size: shards of unequal size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T + 1, V, generator=g, dtype=torch.float64)[:, :-1].float() * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 0] = -100
    lp0 = torch.log_softmax(x.double(), -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    old = (lp0 + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ref = (lp0 + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(B, T, generator=g)
    up = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    return x, labels, old, ref, adv, up


def _kept_sets(labels):
    """CSR kept sets of 1 to 9 ids per row, each holding its label, spread over the whole vocabulary."""
    g = torch.Generator().manual_seed(1)
    ids, off = [], [0]
    for lab in labels.reshape(-1).tolist():
        k = int(torch.randint(1, 10, (1,), generator=g))
        row = [i for i in torch.randperm(V, generator=g).tolist() if i != lab][: k - 1]
        row = ([lab] if lab >= 0 else []) + row
        ids += row
        off.append(len(ids))
    return torch.tensor(ids), torch.tensor(off)


def _shard(V_total, world, rank):
    base, extra = divmod(V_total, world)
    sizes = [base + (1 if r < extra else 0) for r in range(world)]
    lo = sum(sizes[:rank])
    return lo, lo + sizes[rank]


def _compute(x, labels, old, ref, adv, up, backend, group):
    """Every op under test; returns {name: (value, grad of x)}."""
    import fastrlhf

    out = {}

    def run(name, fn):
        xx = x.detach().clone().requires_grad_()
        val = fn(xx)
        (grad,) = torch.autograd.grad(val, xx)
        out[name] = (val.detach(), grad)

    kw = dict(backend=backend, process_group=group)
    run("logp", lambda xx: (fastrlhf.token_logprobs(xx, labels, temperature=0.8, **kw) * up[0]).sum())
    run("logp_ent", lambda xx: sum((a * u).sum() for a, u in zip(
        fastrlhf.token_logprobs_and_entropy(xx, labels, **kw), up)))
    run("entropy", lambda xx: (fastrlhf.entropy(xx, temperature=1.3, **kw) * up[1]).sum())
    # sum_p_squared: S2 = sum_r exp(2 (lse_r - lse)) S2_r, its gradient 2 p (p - S2) on each shard
    run("logp_ent_sp2", lambda xx: sum((a * u).sum() for a, u in zip(
        fastrlhf.token_logprobs_and_entropy(xx, labels, temperature=0.9, sum_p_squared=True, **kw),
        (up[0], up[1], up[0] - 2 * up[1]))))
    # support= (the sampler's kept sets, global ids): each kept logit read on the rank that owns it
    ids, off = _kept_sets(labels)
    run("support", lambda xx: sum((a * u).sum() for a, u in zip(
        fastrlhf.token_logprobs_and_entropy(xx, labels, temperature=0.9, sum_p_squared=True,
                                            support=(ids, off), **kw), (up[0], up[1], up[0] - 2 * up[1]))))
    run("ppo_support", lambda xx: fastrlhf.ppo_clip_loss(xx, labels, old, adv, support=(ids, off), **kw)[0])
    run("ppo", lambda xx: fastrlhf.ppo_clip_loss(xx, labels, old, adv, ref_logprobs=ref, kl_coef=0.1,
                                                 entropy_coef=0.01, **kw)[0])
    run("grpo", lambda xx: fastrlhf.grpo_loss(xx, labels, old, adv[:, 0], ref, loss_agg="seq-mean-token-mean",
                                              **kw)[0])
    run("dpo", lambda xx: fastrlhf.dpo_loss(xx, labels, torch.tensor([-30.0]), torch.tensor([-31.0]), **kw)[0])
    return out


def _worker(rank, world, port, backend, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, labels, old, ref, adv, up = _data()
        lo, hi = _shard(V, world, rank)
        res = _compute(x[..., lo:hi], labels, old, ref, adv, up, backend, dist.group.WORLD)
        # numpy copies pickle by value (tensors would be shared by fd, gone when this process exits)
        queue.put((rank, {k: (v.numpy().copy(), g.numpy().copy()) for k, (v, g) in res.items()}))
    except Exception as e:  # report instead of hanging the parent
        queue.put((rank, repr(e)))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
def test_vocab_parallel_matches_single_process(world, backend):
    import fastrlhf

    if not fastrlhf.available_backends()[backend]:
        pytest.skip(f"{backend} backend unavailable")
    if backend == "triton" and world == 3:
        pytest.skip("one world size is enough under the slow interpreter")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, backend, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=300) for _ in range(world))
    for p in procs:
        p.join(timeout=60)
    for r, res in results.items():
        assert not isinstance(res, str), f"rank {r} failed: {res}"
    x, labels, old, ref, adv, up = _data()
    single = _compute(x, labels, old, ref, adv, up, "torch", None)
    for name, (val, grad) in single.items():
        shards = []
        for r in range(world):
            rval, rgrad = (torch.from_numpy(a) for a in results[r][name])
            torch.testing.assert_close(rval, val, atol=2e-5, rtol=1e-5, msg=f"{name} value on rank {r}")
            shards.append(rgrad)
        torch.testing.assert_close(torch.cat(shards, -1), grad, atol=1e-5, rtol=1e-4, msg=f"{name} gradient")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
