"""verl drop-ins: verl's logprob, entropy, KL and PPO-loss functions with verl's signatures, on fastrlhf.

Usage (in every process that builds an actor, e.g. at the top of the Ray worker's module or
before ``RayPPOTrainer`` creates its workers; engines capture ``entropy_from_logits`` when built)::

    import fastrlhf.integrations.verl as fr_verl
    fr_verl.patch()

Sources read (verl 0.9.1, ``pip download verl==0.9.1``; the same functions at
volcengine/verl main): ``verl/utils/torch_functional.py`` and ``verl/trainer/ppo/core_algos.py``.

- ``logprobs_from_logits(logits, labels, inplace_backward=True)``: fastrlhf ``token_logprobs``
  (fp32 out, as verl's flash-attn path, its GPU default; labels of -100 give 0 as there).
  ``inplace_backward=True`` writes the logits' gradient into the logits' storage, as flash-attn's
  cross-entropy does; verl passes ``False`` when the same logits also feed the entropy.
- ``entropy_from_logits(logits)`` (logits' dtype out) and ``entropy_from_logits_with_chunking(
  logits, chunk_size=2048)`` (fp32 out): fastrlhf ``entropy``, no ``[N, V]`` softmax.
- ``kl_penalty(logprob, ref_logprob, kl_penalty)``: ``kl``/``k1``, ``abs``, ``mse``/``k2``,
  ``low_var_kl``/``k3`` (clamped to [-10, 10]) via ``fastrlhf.kl_estimate``, and the ``"+"``
  straight-through variants (value of the estimator, gradient of k2).
- ``agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size=1, batch_num_tokens=None,
  global_batch_size=None, loss_scale_factor=None)``: verl 0.9.1's global-batch aggregation.
- ``compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask,
  loss_agg_mode="token-mean", config=None, rollout_is_weights=None)`` -> ``(pg_loss, pg_metrics)``
  (verl 0.9.1; older verl returned ``(pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)``, which
  ``patch()`` reproduces when the installed function's annotation says so). The loss is
  ``fastrlhf.token_math.policy_loss_from_logprobs``: ratio clamp +-20, clip-higher
  (``clip_ratio_low``/``clip_ratio_high``), dual clip with ``clip_ratio_c``.

The KL, aggregation and policy-loss functions are ``[N]``-sized: patching them saves no memory;
they are here so that one ``patch()`` gives a verl run whose every loss term is fastrlhf's.
Dtypes: ``kl_penalty`` returns verl's dtype (that of ``logprob - ref_logprob``) and ``agg_loss`` that of
``loss_mat * loss_mask``; both compute in fp32. Difference: an all-masked micro-batch aggregates to 0
where verl divides 0 by 0.
"""

from __future__ import annotations

import inspect
import sys
import types
from typing import Any, Optional, Union

import torch

from .. import logprobs as ops
from .._rows import as_rows3d
from ..ppo import kl_estimate
from ..token_math import as_batch_time, policy_loss_from_logprobs
from ._patch import (
    PatchHandle,
    Target,
    apply_patch,
    check_params,
    ensure_tensor,
    param_names,
    replace_with,
)

__all__ = [
    "logprobs_from_logits",
    "entropy_from_logits",
    "entropy_from_logits_with_chunking",
    "kl_penalty",
    "agg_loss",
    "compute_policy_loss_vanilla",
    "compute_policy_loss_vanilla_tuple",
    "patch",
]

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean")
KL_PENALTIES = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")

# verl's k3 ("low_var_kl") output clamp (core_algos.py::kl_penalty_forward).
K3_CLAMP = (-10.0, 10.0)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = True) -> torch.Tensor:
    """verl's ``logprobs_from_logits``: ``log_softmax(logits)[labels]``, ``logits.shape[:-1]``, fp32.

    fastrlhf ``token_logprobs`` (Triton on CUDA): no ``[N, V]`` log-softmax; labels equal to -100
    give 0 and no gradient (flash-attn's ``ignore_index``, which verl's GPU path uses).
    ``inplace_backward=True``: the logits' gradient overwrites the logits (saves ``N x V`` bytes);
    for logits whose leading dims cannot be merged without a copy (4-D+ non-contiguous) the
    gradient goes to a new buffer instead, which is what flash-attn does on its reshaped copy.
    """
    ensure_tensor(logits, "logits")
    ensure_tensor(labels, "labels")
    batch_dim = tuple(logits.shape[:-1])
    if tuple(labels.shape) != batch_dim and logits.dim() >= 1 and labels.numel() == logits[..., 0].numel():
        # verl's default (flash-attn) path runs on logits.reshape(-1, V) and labels.reshape(-1) and views
        # the result as logits.shape[:-1]: any labels with one id per row are accepted (e.g. [1, N] for [N, V]).
        labels = labels.reshape(batch_dim)
    inplace = bool(inplace_backward) and logits.dim() >= 2 and as_rows3d(logits).data_ptr() == logits.data_ptr()
    return ops.token_logprobs(logits, labels, inplace_backward=inplace)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """verl's ``entropy_from_logits``: ``logsumexp(x) - sum(softmax(x) * x)`` per row, in the logits' dtype.

    Computed in fp32 by fastrlhf ``entropy`` (no ``[..., V]`` softmax), cast as verl returns it.
    """
    ensure_tensor(logits, "logits")
    return ops.entropy(logits).to(logits.dtype)


def entropy_from_logits_with_chunking(logits: torch.Tensor, chunk_size: int = 2048) -> torch.Tensor:
    """verl's ``entropy_from_logits_with_chunking``: per-row entropy, fp32 (verl's buffer dtype).

    ``chunk_size`` is checked and otherwise unused: fastrlhf streams the vocabulary per row.
    """
    ensure_tensor(logits, "logits")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    return ops.entropy(logits).float()


def _kl_forward(logprob: torch.Tensor, ref_logprob: torch.Tensor, name: str) -> torch.Tensor:
    if name in ("kl", "k1"):
        return kl_estimate(logprob, ref_logprob, "k1")
    if name == "abs":
        return kl_estimate(logprob, ref_logprob, "k1").abs()
    if name in ("mse", "k2"):
        return kl_estimate(logprob, ref_logprob, "k2")
    if name in ("low_var_kl", "k3"):
        return kl_estimate(logprob, ref_logprob, "k3", clamp=K3_CLAMP)
    if name == "full":
        # verl raises too: it would need the full-vocabulary distributions, not token logprobs.
        raise NotImplementedError("kl_penalty='full' needs full-vocabulary logprobs; verl does not implement it")
    raise NotImplementedError(f"kl_penalty must be one of {KL_PENALTIES} (optionally with '+'), got {name!r}")


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str) -> torch.Tensor:
    """verl's ``kl_penalty``: per-token KL(policy || ref) estimate (Schulman 2020), via ``fastrlhf.kl_estimate``.

    ``kl``/``k1``: ``logprob - ref_logprob``; ``abs``: its absolute value; ``mse``/``k2``:
    ``0.5 * (logprob - ref_logprob)^2``; ``low_var_kl``/``k3``: ``exp(r) - r - 1`` with
    ``r = clamp(ref_logprob - logprob, -20, 20)``, clamped to [-10, 10]. A ``"+"`` suffix
    (``"k3+"``) keeps that value with the gradient of k2 (straight-through: k2's gradient is
    the unbiased one). Unknown names raise ``NotImplementedError``, as in verl.
    """
    ensure_tensor(logprob, "logprob")
    ensure_tensor(ref_logprob, "ref_logprob")
    if not isinstance(kl_penalty, str):
        raise TypeError(f"kl_penalty must be a str, got {type(kl_penalty).__name__}")
    straight = kl_penalty.endswith("+")
    # Computed in fp32 (fastrlhf.kl_estimate), returned in verl's dtype: that of logprob - ref_logprob.
    out = torch.promote_types(logprob.dtype, ref_logprob.dtype)
    forward_score = _kl_forward(logprob, ref_logprob, kl_penalty[:-1] if straight else kl_penalty).to(out)
    if not straight or kl_penalty in ("mse", "k2"):
        return forward_score
    backward_score = kl_estimate(logprob, ref_logprob, "k2").to(out)
    return backward_score - backward_score.detach() + forward_score.detach()


def _agg_weights(
    loss_mask: torch.Tensor,
    loss_agg_mode: str,
    dp_size: int = 1,
    batch_num_tokens=None,
    global_batch_size=None,
    loss_scale_factor=None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-token weights ``w`` with ``loss = sum(loss_mat * w)`` for verl 0.9.1's ``agg_loss`` (``[B, T]``).

    token-mean ``m / n_tok * dp``; token-sum ``m * dp``; seq-mean-token-sum ``m / n_seq * dp``
    (``/ loss_scale_factor``, default ``T``, for -norm); seq-mean-token-mean
    ``m / (sum_t m + 1e-8) / n_seq * dp``; where ``n_tok`` is ``batch_num_tokens`` (default: the
    micro-batch's counted tokens) and ``n_seq`` is ``global_batch_size`` (default: its sequences
    with a counted token). Locally the same normalisations as ``fastrlhf.token_math.loss_agg_weights``
    (token-mean, seq-mean-token-mean), except that verl's seq-mean-token-sum(-norm) count only
    non-empty sequences.
    """
    if loss_agg_mode not in AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {loss_agg_mode!r}")
    m = as_batch_time(loss_mask).to(dtype)  # [B, T]
    if dp_size > 1 and loss_agg_mode == "token-mean" and batch_num_tokens is None:
        raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
    if dp_size > 1 and loss_agg_mode.startswith("seq-") and global_batch_size is None:
        raise ValueError("global_batch_size is required when dp_size > 1")
    if loss_agg_mode == "token-mean":
        n_tok = m.sum().clamp_min(1.0) if batch_num_tokens is None else batch_num_tokens
        return m / n_tok * dp_size
    if loss_agg_mode == "token-sum":
        return m * dp_size
    per_seq = m.sum(-1, keepdim=True)  # [B, 1]
    n_seq = (per_seq > 0).sum().clamp_min(1).to(dtype) if global_batch_size is None else global_batch_size
    if loss_agg_mode == "seq-mean-token-mean":
        return m / (per_seq + 1e-8) / n_seq * dp_size
    w = m / n_seq * dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":
        w = w / (m.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return w


def agg_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_agg_mode: str,
    dp_size: int = 1,
    batch_num_tokens: Optional[int] = None,
    global_batch_size: Optional[int] = None,
    loss_scale_factor: Optional[int] = None,
) -> torch.Tensor:
    """verl 0.9.1's ``agg_loss``: a ``(bs, response_length)`` loss matrix to a scalar, invariant to DP sharding.

    Modes ``token-mean``, ``token-sum``, ``seq-mean-token-sum``, ``seq-mean-token-sum-norm``
    (Dr. GRPO), ``seq-mean-token-mean``; see :func:`_agg_weights`. ``dp_size > 1`` needs the
    global ``batch_num_tokens`` (token-mean) / ``global_batch_size`` (seq modes), as in verl.
    Values outside the mask never reach the sum (NaN-safe, as verl's ``masked_sum``).
    """
    ensure_tensor(loss_mat, "loss_mat")
    ensure_tensor(loss_mask, "loss_mask")
    if loss_mat.shape != loss_mask.shape:
        raise ValueError(
            f"loss_mask must have the shape of loss_mat {tuple(loss_mat.shape)}, got {tuple(loss_mask.shape)}"
        )
    # verl's dtype is that of masked_sum(loss_mat, loss_mask) = (loss_mat * loss_mask).sum(): a float mask
    # promotes a bf16 loss_mat to fp32. The sum itself is always accumulated in fp32 (fp64 for fp64).
    out = loss_mat.dtype if loss_mat.is_floating_point() else torch.float32
    if loss_mask.is_floating_point():
        out = torch.promote_types(out, loss_mask.dtype)
    dt = torch.float64 if out == torch.float64 else torch.float32
    w = _agg_weights(loss_mask, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor, dt)
    x = as_batch_time(torch.where(loss_mask.bool(), loss_mat.to(dt), torch.zeros((), dtype=dt, device=loss_mat.device)))
    return (x * w).sum().to(out)


def _cfg(config: Any, key: str, default: Any = None) -> Any:
    """``config.key`` for verl's ActorConfig / DictConfig / a plain namespace or dict."""
    if isinstance(config, dict):
        return config.get(key, default)
    getter = getattr(config, "get", None)
    if callable(getter):
        try:
            return getter(key, default)
        except Exception:  # a .get with another meaning: fall back to the attribute
            pass
    return getattr(config, key, default)


def _policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights):
    """The loss tensor and the three verl metrics (tensors); shared by both return conventions."""
    if config is None:
        raise ValueError("config is required (verl's actor config: clip_ratio, clip_ratio_low/high, clip_ratio_c)")
    for name, t in (("old_log_prob", old_log_prob), ("log_prob", log_prob), ("advantages", advantages),
                    ("response_mask", response_mask)):
        ensure_tensor(t, name)
        if t.shape != log_prob.shape:
            raise ValueError(f"{name} must have the shape of log_prob {tuple(log_prob.shape)}, got {tuple(t.shape)}")
    clip_ratio = _cfg(config, "clip_ratio")
    low = _cfg(config, "clip_ratio_low")
    high = _cfg(config, "clip_ratio_high")
    low = clip_ratio if low is None else low
    high = clip_ratio if high is None else high
    if low is None or high is None:
        raise ValueError("config must set clip_ratio (or both clip_ratio_low and clip_ratio_high)")
    clip_ratio_c = _cfg(config, "clip_ratio_c", 3.0)
    if not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c (dual-clip lower bound, Ye et al. 2020) must be > 1.0, got {clip_ratio_c}")
    batch_info: dict[str, Any] = dict(_cfg(config, "global_batch_info", None) or {})

    lp = as_batch_time(log_prob)
    old = as_batch_time(old_log_prob)
    A = as_batch_time(advantages).to(lp.dtype)
    m = as_batch_time(response_mask)
    counted = m.bool().to(lp.dtype)
    # verl weights token t by s_t = (aggregation weight) * (rollout IS weight). PPO-clip's
    # per-token loss is positively homogeneous in A (pg(s*A) = s * pg(A) for s >= 0, dual clip
    # included), so sum_t pg(A_t) * s_t = sum_t pg(s_t * A_t): fastrlhf's PPO math on
    # scaled advantages, summed ("seq-mean-token-sum" over one row = plain sum), is verl's loss.
    s = _agg_weights(m, loss_agg_mode, dtype=lp.dtype, **batch_info)
    if rollout_is_weights is not None:
        ensure_tensor(rollout_is_weights, "rollout_is_weights")
        isw = as_batch_time(rollout_is_weights).to(lp.dtype)
        if bool((isw < 0).any()):
            raise ValueError("rollout_is_weights must be >= 0 (importance weights)")
        s = s * isw
    loss, _ = policy_loss_from_logprobs(
        lp.reshape(1, -1), counted.bool().reshape(1, -1), old.reshape(1, -1), (A * s).reshape(1, -1),
        clip_low=low, clip_high=high, dual_clip=clip_ratio_c, loss_agg="seq-mean-token-sum",
    )
    # Metrics exactly as verl computes them (with the unscaled advantages): masked means with +1e-8.
    with torch.no_grad():
        neg_kl = torch.clamp(lp.detach() - old, -20.0, 20.0)
        ratio = torch.exp(neg_kl)
        pg1 = -A * ratio
        pg2 = -A * torch.clamp(ratio, 1 - low, 1 + high)
        clip1 = torch.maximum(pg1, pg2)
        pg3 = -A * clip_ratio_c

        def masked_mean(x):
            return torch.where(m.bool(), x, 0.0).mul(m).sum() / (m.sum() + 1e-8)

        pg_clipfrac = masked_mean(torch.gt(pg2, pg1).float())
        ppo_kl = masked_mean(-neg_kl)
        pg_clipfrac_lower = masked_mean(torch.gt(clip1, pg3).float() * (A < 0).float())
    return loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower


def compute_policy_loss_vanilla(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """verl 0.9.1's ``compute_policy_loss_vanilla`` (PPO-clip, Schulman et al. 2017) -> ``(pg_loss, pg_metrics)``.

    Per token ``ratio = exp(clamp(log_prob - old_log_prob, -20, 20))``,
    ``pg = max(-A ratio, -A clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high))`` and, where
    ``A < 0``, ``min(pg, -A clip_ratio_c)`` (dual clip, Ye et al. 2020); times
    ``rollout_is_weights`` when given; aggregated by :func:`agg_loss` with
    ``config.global_batch_info``. ``config``: verl's actor config (``clip_ratio``,
    ``clip_ratio_low``, ``clip_ratio_high``, ``clip_ratio_c`` default 3.0). Metrics (floats):
    ``actor/pg_clipfrac``, ``actor/ppo_kl`` (mean k1 of old vs new), ``actor/pg_clipfrac_lower``.
    """
    loss, clipfrac, ppo_kl, clipfrac_lower = _policy_loss(
        old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights
    )
    metrics = {
        "actor/pg_clipfrac": clipfrac.item(),
        "actor/ppo_kl": ppo_kl.item(),
        "actor/pg_clipfrac_lower": clipfrac_lower.item(),
    }
    return loss, metrics


def compute_policy_loss_vanilla_tuple(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`compute_policy_loss_vanilla` with the earlier verl return ``(pg_loss, pg_clipfrac, ppo_kl,
    pg_clipfrac_lower)`` (tensors), for verl versions whose function is annotated that way."""
    return _policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)


_AGG_PARAMS = ["loss_mat", "loss_mask", "loss_agg_mode", "dp_size", "batch_num_tokens", "global_batch_size",
               "loss_scale_factor"]
_PL_PARAMS = ["old_log_prob", "log_prob", "advantages", "response_mask", "loss_agg_mode", "config",
              "rollout_is_weights"]


def _check_policy_loss(original: Any) -> Optional[str]:
    theirs = param_names(original)
    if theirs not in (_PL_PARAMS, _PL_PARAMS[:-1]):
        return f"its parameters {theirs} differ from {_PL_PARAMS}"
    # Our loss aggregates with verl 0.9.1's agg_loss; older agg_loss normalised the seq modes
    # differently, so the policy loss is only swapped where agg_loss has the same API.
    home = sys.modules.get(getattr(original, "__module__", None) or "")
    agg = getattr(home, "agg_loss", None)
    if agg is None or param_names(agg) != _AGG_PARAMS:
        return "the installed agg_loss predates verl's global-batch API (dp_size, batch_num_tokens, ...)"
    return None


def _make_policy_loss(original: Any) -> Any:
    try:
        ret = inspect.signature(original).return_annotation
    except (TypeError, ValueError):
        ret = inspect.Signature.empty
    text = ret if isinstance(ret, str) else repr(ret)
    returns_dict = ret is not inspect.Signature.empty and "dict" in text
    fn = compute_policy_loss_vanilla if returns_dict else compute_policy_loss_vanilla_tuple
    return replace_with(fn)(original)


def patch(module: Union[str, types.ModuleType, None] = None) -> PatchHandle:
    """Replace verl's logprob/entropy/KL/policy-loss functions by this module's (see the module docstring).

    Rewrites every loaded ``verl.*`` module that holds them by name and registries such as
    ``POLICY_LOSS_REGISTRY["vanilla"]``. Call before the actor/engine is built, in each worker
    process. Returns a handle (``undo()``, context manager). Functions the installed verl lacks,
    or whose signature differs, are skipped with an ``IntegrationWarning``.

    Args:
        module: ``"verl"`` (default), another package name, or a module (stand-in trees in
            tests). ``ImportError`` if it cannot be imported.
    """
    tf = "utils.torch_functional"
    ca = "trainer.ppo.core_algos"
    targets = [
        Target(tf, "logprobs_from_logits", replace_with(logprobs_from_logits),
               check_params(["logits", "labels", "inplace_backward"])),
        Target(tf, "entropy_from_logits", replace_with(entropy_from_logits), check_params(["logits"])),
        Target(tf, "entropy_from_logits_with_chunking", replace_with(entropy_from_logits_with_chunking),
               check_params(["logits", "chunk_size"])),
        Target(ca, "kl_penalty", replace_with(kl_penalty), check_params(["logprob", "ref_logprob", "kl_penalty"])),
        Target(ca, "agg_loss", replace_with(agg_loss), check_params(_AGG_PARAMS, exact=True)),
        Target(ca, "compute_policy_loss_vanilla", _make_policy_loss, _check_policy_loss),
    ]
    return apply_patch("verl" if module is None else module, targets, label="verl",
                       install_hint="pip install verl", caller="fastrlhf.integrations.verl")

