"""fastrlhf.integrations.trl against the installed TRL (pip install trl; tested with TRL 1.16.0).

Two layers: each drop-in against TRL's own function and the fp64 oracle (fastrlhf.reference)
over fp32/bf16, 2-D/3-D, K > 1, temperature, row_mask; then a real GRPOTrainer and DPOTrainer
run on a tiny local Llama (built from a config, tokenizer built in-process) with and without
patch(): same losses and gradients, and a spy proving the patched run went through fastrlhf.
"""

import os
import warnings

import pytest
import torch
from conftest import assert_grad_close

from fastrlhf import reference as R

trl_utils = pytest.importorskip("trl.trainer.utils")

import fastrlhf.integrations.trl as F  # noqa: E402
from fastrlhf.integrations import IntegrationWarning  # noqa: E402
from fastrlhf.integrations._patch import param_names  # noqa: E402

# TRL's originals, read once (no test leaves a patch active; asserted in _trl_fn). Written for
# TRL 1.16.0; what an older TRL lacks is skipped, not failed.
TRL_FNS = {
    name: getattr(trl_utils, name, None)
    for name in ("selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy")
}
try:
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction as TRL_CHUNKED
except ImportError:  # TRL < 1.0: no fused LM head
    TRL_CHUNKED = None

DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(13, 50), (3, 5, 50)]  # [N, V] and [B, T, V]; V = 50 is not a power of two


def _trl_fn(name, *needs):
    """TRL's function ``name``; skips the test if this TRL lacks it or its parameters ``needs``."""
    fn = TRL_FNS[name]
    if fn is None or not set(needs) <= set(param_names(fn) or ()):
        pytest.skip(f"the installed TRL has no {name}({', '.join(needs)})")
    assert not hasattr(fn, "__fastrlhf_original__")
    return fn


def _upstream(shape, g, dtype):
    """A random upstream gradient, exactly representable in ``dtype``: a bf16 output receives a
    bf16 gradient, and the fp64 oracle must see that same value."""
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).double()


def _logits(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)


def _value_and_grad(fn, logits, upstream, *args, **kwargs):
    """``fn(x)`` and ``d sum(fn(x) * upstream) / dx`` (tuples: one upstream per output)."""
    x = logits.clone().requires_grad_(True)
    out = fn(x, *args, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    ups = upstream if isinstance(upstream, tuple) else (upstream,)
    loss = sum((o.double() * u).sum() for o, u in zip(outs, ups) if o.requires_grad)
    grad = torch.autograd.grad(loss, x)[0] if isinstance(loss, torch.Tensor) else torch.zeros_like(x)
    return tuple(o.detach() for o in outs), grad


def _oracle_logprobs(x64, index, temperature, row_mask):
    """fp64 log_softmax(x / T) at ``index [...]`` or ``[..., K]``, zero where ``row_mask == 0``."""
    if index.dim() == x64.dim() - 1:
        out = R.token_logprobs(x64, index, temperature=temperature)
    else:
        out = torch.stack([R.token_logprobs(x64, index[..., k], temperature=temperature)
                           for k in range(index.shape[-1])], -1)
    return out if row_mask is None else out.masked_fill(row_mask == 0, 0.0)


def _check_values(ours, theirs, exact, dtype):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    if dtype == torch.float32:
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(ours.double(), exact, atol=2e-5, rtol=1e-5)
    else:
        # TRL's bf16 path computes log_softmax in bf16; ours computes in fp32 and rounds once: our
        # error against the exact value is at most twice the rounding error of the exact value.
        own = (exact.to(dtype).double() - exact).abs().max().item()
        err = (ours.double() - exact).abs().max().item()
        assert err <= 2 * own + 1e-6, f"bf16 error {err:.3g} > 2 x rounding {own:.3g}"


def _check_grads(ours, theirs, exact, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    assert_grad_close(ours, exact, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [None, 3])
@pytest.mark.parametrize("temperature,masked", [(1.0, False), (0.7, True)])
def test_selective_log_softmax_matches_trl(dtype, shape, k, temperature, masked):
    logits = _logits(shape, dtype)
    V = shape[-1]
    g = torch.Generator().manual_seed(1)
    ishape = shape[:-1] if k is None else shape[:-1] + (k,)
    index = torch.randint(0, V, ishape, generator=g)
    row_mask = (torch.rand(ishape, generator=g) > 0.3) if masked else None
    up = _upstream(ishape, g, dtype)

    (ours,), g_ours = _value_and_grad(F.selective_log_softmax, logits, up, index, temperature, row_mask)
    (theirs,), g_trl = _value_and_grad(_trl_fn("selective_log_softmax", "temperature", "row_mask"), logits, up, index,
                                      temperature, row_mask)
    assert ours.shape == ishape and ours.dtype == dtype  # TRL's CPU path returns the logits' dtype
    exact, g_exact = _value_and_grad(lambda x: _oracle_logprobs(x, index, temperature, row_mask),
                                     logits.double(), up)
    _check_values(ours, theirs, exact[0], dtype)
    _check_grads(g_ours, g_trl, g_exact, dtype)
    if masked and k is None:
        assert (ours[~row_mask] == 0).all() and (g_ours[~row_mask] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_entropy_from_logits_matches_trl(dtype, shape):
    logits = _logits(shape, dtype, seed=2)
    up = _upstream(shape[:-1], torch.Generator().manual_seed(3), dtype)
    (ours,), g_ours = _value_and_grad(F.entropy_from_logits, logits, up, chunk_size=4)
    (theirs,), g_trl = _value_and_grad(_trl_fn("entropy_from_logits"), logits, up, chunk_size=4)
    assert ours.shape == shape[:-1] and ours.dtype == dtype
    exact, g_exact = _value_and_grad(R.entropy, logits.double(), up)
    _check_values(ours, theirs, exact[0], dtype)
    _check_grads(g_ours, g_trl, g_exact, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature,masked,entropy_grad", [(1.0, False, True), (0.8, True, True), (1.3, True, False)])
def test_selective_log_softmax_and_entropy_matches_trl(dtype, shape, temperature, masked, entropy_grad):
    logits = _logits(shape, dtype, seed=4)
    g = torch.Generator().manual_seed(5)
    index = torch.randint(0, shape[-1], shape[:-1], generator=g)
    row_mask = (torch.rand(shape[:-1], generator=g) > 0.3).long() if masked else None
    up = (_upstream(shape[:-1], g, dtype), _upstream(shape[:-1], g, dtype))
    args = (index, entropy_grad, temperature, row_mask)
    ours, g_ours = _value_and_grad(F.selective_log_softmax_and_entropy, logits, up, *args)
    theirs, g_trl = _value_and_grad(_trl_fn("selective_log_softmax_and_entropy", "row_mask"), logits, up, *args)

    def oracle(x):
        lp, ent = R.token_logprobs_and_entropy(x, index, temperature=temperature)
        if row_mask is not None:
            lp, ent = lp.masked_fill(row_mask == 0, 0.0), ent.masked_fill(row_mask == 0, 0.0)
        return lp, (ent if entropy_grad else ent.detach())

    exact, g_exact = _value_and_grad(oracle, logits.double(), up)
    for o, t, e in zip(ours, theirs, exact):
        _check_values(o, t, e, dtype)
    _check_grads(g_ours, g_trl, g_exact, dtype)


def test_selective_log_softmax_and_entropy_k_indices():
    logits = _logits((4, 6, 40), torch.float32, seed=6)
    index = torch.randint(0, 40, (4, 6, 3), generator=torch.Generator().manual_seed(7))
    lp, ent = F.selective_log_softmax_and_entropy(logits, index)
    lp_t, ent_t = _trl_fn("selective_log_softmax_and_entropy")(logits, index)
    torch.testing.assert_close(lp, lp_t, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ent_t, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="row_mask"):
        F.selective_log_softmax_and_entropy(logits, index, row_mask=torch.ones(4, 6, 3))


@pytest.mark.parametrize("masked", [False, True])
def test_fused_variant_is_fp32_and_exact(masked):
    """trl.kernels.logprob_entropy's signature and fp32 outputs (its kernel itself needs CUDA: see below)."""
    logits = _logits((3, 5, 50), torch.bfloat16, seed=8)
    g = torch.Generator().manual_seed(9)
    index = torch.randint(0, 50, (3, 5), generator=g)
    row_mask = (torch.rand(3, 5, generator=g) > 0.4) if masked else None
    up = (torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64))
    ours, g_ours = _value_and_grad(F.fused_selective_log_softmax_and_entropy, logits, up, index, 0.9, row_mask)
    assert all(o.dtype == torch.float32 for o in ours)

    def oracle(x):
        lp, ent = R.token_logprobs_and_entropy(x, index, temperature=0.9)
        return (lp, ent) if row_mask is None else (lp.masked_fill(~row_mask, 0.0), ent.masked_fill(~row_mask, 0.0))

    exact, g_exact = _value_and_grad(oracle, logits.double(), up)
    for o, e in zip(ours, exact):
        torch.testing.assert_close(o.double(), e, atol=1e-5, rtol=1e-5)
    assert_grad_close(g_ours, g_exact, torch.bfloat16)


@pytest.mark.gpu
def test_fused_variant_matches_trl_triton_kernel():
    kern = pytest.importorskip("trl.kernels.logprob_entropy")
    logits = _logits((4, 64, 1000), torch.bfloat16, seed=10).cuda()
    index = torch.randint(0, 1000, (4, 64), device="cuda")
    row_mask = torch.rand(4, 64, device="cuda") > 0.2
    ours = F.fused_selective_log_softmax_and_entropy(logits, index, 0.7, row_mask)
    theirs = kern.selective_log_softmax_and_entropy(logits, index, 0.7, row_mask)
    for o, t in zip(ours, theirs):
        assert o.dtype == t.dtype == torch.float32
        torch.testing.assert_close(o, t, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------
# TRL 1.x fused LM head (ChunkedLogProbFunction)
# ----------------------------------------------------------------------------------------


def _chunked_oracle(h, w, b, targets, temperature, softcap, scale):
    """fp64: logits = h @ w.T + b -> TRL's transform -> fastrlhf.reference, all outputs."""
    z = h.double() @ w.double().T + (0 if b is None else b.double())
    y = z * scale
    if softcap is not None:
        y = softcap * torch.tanh(y / softcap)
    x = y / temperature
    lp, ent = R.token_logprobs_and_entropy(x, targets)
    lssp = torch.logsumexp(2 * x, -1) - 2 * torch.logsumexp(x, -1)
    return lp, ent, lssp, x.mean(-1), x.argmax(-1) == targets


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap,scale,temperature", [(None, 1.0, 1.0), (None, 0.5, 0.7), (30.0, 1.3, 0.9)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_logprob_function_matches_trl(monkeypatch, dtype, softcap, scale, temperature, with_bias):
    if TRL_CHUNKED is None:
        pytest.skip("the installed TRL has no ChunkedLogProbFunction (TRL < 1.0)")
    monkeypatch.setattr(F, "BLOCK_ELEMENTS", 4 * 50)  # 4 rows per block: several blocks and a ragged last one
    g = torch.Generator().manual_seed(11)
    N, H, V = 13, 16, 50
    h0 = torch.randn(N, H, generator=g).to(dtype)
    w0 = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    b0 = torch.randn(V, generator=g).to(dtype) if with_bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    up = (torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64))

    def run(fn, cast=None):
        params = [t.clone().to(cast or t.dtype).requires_grad_(True) for t in (h0, w0) + ((b0,) if with_bias else ())]
        h, w = params[:2]
        b = params[2] if with_bias else None
        if fn is None:
            outs = _chunked_oracle(h, w, b, targets, temperature, softcap, scale)
        else:
            outs = fn.apply(h, w, b, targets, temperature, 16, softcap, scale, F.OPTIONAL_OUTPUTS)
        loss = (outs[0].double() * up[0]).sum() + (outs[1].double() * up[1]).sum()
        grads = torch.autograd.grad(loss, params)
        return [o.detach() for o in outs], grads

    ours, g_ours = run(F.ChunkedLogProbFunction)
    theirs, g_trl = run(TRL_CHUNKED)
    exact, g_exact = run(None, cast=torch.float64)
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    for o, t, e in zip(ours[:4], theirs[:4], exact[:4]):
        assert o.dtype == t.dtype == torch.float32 and o.shape == (N,)
        err, trl_err = (o.double() - e).abs().max().item(), (t.double() - e).abs().max().item()
        assert err <= 2 * trl_err + atol, f"value error {err:.3g} vs TRL's {trl_err:.3g}"
    assert torch.equal(ours[4], theirs[4]) and torch.equal(ours[4], exact[4])
    for o, t, e in zip(g_ours, g_trl, g_exact):
        assert o.dtype == t.dtype == dtype
        err, trl_err = (o.double() - e).abs().max().item(), (t.double() - e).abs().max().item()
        assert err <= 2 * trl_err + atol * max(1.0, e.abs().max().item()), f"grad error {err:.3g} vs {trl_err:.3g}"


def test_chunked_logprob_function_optional_outputs():
    g = torch.Generator().manual_seed(12)
    h = torch.randn(5, 8, generator=g, requires_grad=True)
    w = torch.randn(30, 8, generator=g, requires_grad=True)
    t = torch.randint(0, 30, (5,), generator=g)
    lp, ent, lssp, mean, top1 = F.ChunkedLogProbFunction.apply(h, w, None, t, 1.0, 8, None, 1.0, ("log_probs",))
    assert ent is None and lssp is None and mean is None and top1 is None
    lp.sum().backward()
    torch.testing.assert_close(h.grad, torch.autograd.grad(R.token_logprobs(h @ w.T, t).sum(), h)[0], atol=1e-5,
                               rtol=1e-5)


# ----------------------------------------------------------------------------------------
# patch() on the installed TRL
# ----------------------------------------------------------------------------------------


def test_patch_replaces_every_reference_and_undo_restores():
    import trl
    import trl.kernels

    with F.patch() as h:
        assert h.package == "trl" and h.version == trl.__version__
        assert "trl.trainer.utils.selective_log_softmax" in h.patched
        assert trl_utils.selective_log_softmax.__wrapped__ is F.selective_log_softmax
        if TRL_CHUNKED is not None:
            assert "trl.kernels.chunked_logprob.ChunkedLogProbFunction" in h.patched
            # the alias trl.trainer.utils uses, and the re-export of trl.kernels
            assert "trl.trainer.utils._ChunkedLogProbFunction" in h.sites
            assert "trl.kernels.ChunkedLogProbFunction" in h.sites
            assert trl_utils._ChunkedLogProbFunction.__fastrlhf_original__ is TRL_CHUNKED
            assert issubclass(trl_utils._ChunkedLogProbFunction, F.ChunkedLogProbFunction)
        with pytest.warns(IntegrationWarning, match="already patched"):
            again = F.patch()
        assert again.patched == []
    if TRL_CHUNKED is not None:
        assert trl_utils._ChunkedLogProbFunction is TRL_CHUNKED and trl.kernels.ChunkedLogProbFunction is TRL_CHUNKED
    for name, fn in TRL_FNS.items():
        assert getattr(trl_utils, name, None) is fn
    h.undo()  # idempotent


# ----------------------------------------------------------------------------------------
# Real trainer steps on a tiny local model, with and without patch()
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 1-layer Llama (V = 64) and a word-level tokenizer, saved to a temp dir: nothing is downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(special + [f"w{i}" for i in range(60)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>")
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("tiny_llama"))
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, tokenizer


@pytest.fixture
def spy(monkeypatch):
    """Counts the fastrlhf ops called by the drop-ins (whichever TRL function the trainer uses)."""
    calls = []
    real = F.ops

    class CountingOps:
        def __getattr__(self, name):
            attr = getattr(real, name)
            if not callable(attr):
                return attr

            def counted(*args, **kwargs):
                calls.append(name)
                return attr(*args, **kwargs)

            return counted

    monkeypatch.setattr(F, "ops", CountingOps())
    return calls


def _train(trainer_cls, config_cls, tiny_model, patched, spy, dataset, **kwargs):
    """Two optimizer steps; returns (loss of each step, gradients at each step, spy calls during the run)."""
    from transformers import TrainerCallback

    path, tokenizer = tiny_model
    grads, losses = [], []

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    class Recording(trainer_cls):
        def compute_loss(self, *a, **k):
            out = super().compute_loss(*a, **k)
            losses.append((out[0] if isinstance(out, tuple) else out).detach().clone())
            return out

    before = len(spy)
    handle = F.patch() if patched else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers 5 deprecation chatter
            args = config_cls(output_dir=os.path.join(path, "out"), max_steps=2, learning_rate=1e-2, logging_steps=1,
                              report_to="none", save_strategy="no", use_cpu=True, bf16=False, seed=0,
                              dataloader_num_workers=0, disable_tqdm=True, **kwargs)
            trainer = Recording(model=path, args=args, train_dataset=dataset, processing_class=tokenizer,
                                callbacks=[Grab()], **({} if trainer_cls.__name__ != "GRPOTrainer" else {
                                    "reward_funcs": lambda completions, **kw: [len(c) % 3 for c in completions]}))
            trainer.train()
    finally:
        if handle is not None:
            handle.undo()
    return losses, grads, len(spy) - before


def _assert_same_run(base, patched):
    (l0, g0, calls0), (l1, g1, calls1) = base, patched
    assert calls0 == 0 and calls1 > 0, "the patched run must go through fastrlhf (and the baseline must not)"
    assert len(l0) == len(l1) == 2 and len(g0) == len(g1) == 2
    for a, b in zip(l0, l1):
        assert abs(a.item() - b.item()) <= 1e-5, (a.item(), b.item())
    for ga, gb in zip(g0, g1):
        assert ga.keys() == gb.keys()
        for name in ga:
            torch.testing.assert_close(gb[name], ga[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_grpo_trainer_step_same_with_patch(tiny_model, spy):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    ds = Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10 w11"] * 2})
    # beta > 0 adds the reference model's logprobs (also through the patched head); the entropy
    # bonus sends a gradient through the entropy output.
    kw = dict(per_device_train_batch_size=4, num_generations=4, max_completion_length=6, beta=0.1,
              entropy_coef=0.01)
    base = _train(GRPOTrainer, GRPOConfig, tiny_model, False, spy, ds, **kw)
    patched = _train(GRPOTrainer, GRPOConfig, tiny_model, True, spy, ds, **kw)
    _assert_same_run(base, patched)
    assert getattr(trl_utils, "_ChunkedLogProbFunction", None) is TRL_CHUNKED


@pytest.mark.slow
def test_dpo_trainer_step_same_with_patch(tiny_model, spy):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    ds = Dataset.from_dict({
        "prompt": ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10"],
        "chosen": [" w11 w12", " w13", " w14 w15 w16", " w17"],
        "rejected": [" w20", " w21 w22 w23", " w24", " w25 w26"],
    })
    base = _train(DPOTrainer, DPOConfig, tiny_model, False, spy, ds, per_device_train_batch_size=2, beta=0.5)
    patched = _train(DPOTrainer, DPOConfig, tiny_model, True, spy, ds, per_device_train_batch_size=2, beta=0.5)
    _assert_same_run(base, patched)
