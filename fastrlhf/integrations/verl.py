"""verl drop-ins: verl's logprob, entropy, KL and PPO-loss functions with verl's signatures, on fastrlhf.

Usage (in every process that builds an actor, e.g. at the top of the Ray worker's module or
before ``RayPPOTrainer`` creates its workers; engines capture ``entropy_from_logits`` when built)::

    import fastrlhf.integrations.verl as fr_verl
    fr_verl.patch()

Sources read (verl 0.9.1, ``pip download verl==0.9.1``; the same functions at verl-project/verl
@ 1dda039b): ``verl/utils/torch_functional.py`` and ``verl/trainer/ppo/core_algos.py``.

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
- The policy losses of verl's ``POLICY_LOSS_REGISTRY``, each ``f(old_log_prob, log_prob, advantages,
  response_mask, loss_agg_mode, config=None, rollout_is_weights=None)`` -> ``(pg_loss, pg_metrics)``
  (or, where the installed function is annotated so, earlier verl's ``(pg_loss, pg_clipfrac,
  ppo_kl, pg_clipfrac_lower)``): ``compute_policy_loss_vanilla`` (PPO-clip, clip-higher, dual clip
  ``clip_ratio_c``), ``compute_policy_loss_gspo`` (verl's GSPO-token form), ``compute_policy_loss_sapo``
  and ``compute_policy_loss_cispo`` (verl's weight clamp with the floor ``1 - clip_ratio_low``), with
  verl's ``rollout_is_weights`` (TIS / IcePop) as per-token weights. In
  :mod:`fastrlhf.integrations.verl_losses`, which lists sources, routes and differences.
  verl's ``rollout_corr_helper.compute_rollout_correction_weights`` is not replaced: it runs in the
  driver without gradient and returns some 15 metrics; its weights reach the patched losses.

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
from ..token_math import as_batch_time
from ._patch import (
    PatchHandle,
    Target,
    apply_patch,
    check_params,
    ensure_tensor,
    param_names,
    replace_with,
)
from .verl_losses import (
    AGG_MODES,
    _agg_weights,
    compute_policy_loss_cispo,
    compute_policy_loss_cispo_tuple,
    compute_policy_loss_gspo,
    compute_policy_loss_gspo_tuple,
    compute_policy_loss_sapo,
    compute_policy_loss_sapo_tuple,
    compute_policy_loss_vanilla,
    compute_policy_loss_vanilla_tuple,
)

__all__ = [
    "logprobs_from_logits",
    "entropy_from_logits",
    "entropy_from_logits_with_chunking",
    "kl_penalty",
    "agg_loss",
    "AGG_MODES",
    "compute_policy_loss_vanilla",
    "compute_policy_loss_vanilla_tuple",
    "compute_policy_loss_gspo",
    "compute_policy_loss_gspo_tuple",
    "compute_policy_loss_sapo",
    "compute_policy_loss_sapo_tuple",
    "compute_policy_loss_cispo",
    "compute_policy_loss_cispo_tuple",
    "patch",
]

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


def _make_policy_loss(returns_dict_fn: Any, returns_tuple_fn: Any):
    """``make`` for a policy loss: the dict-returning drop-in, or its 4-tuple twin where the installed
    function is annotated with the earlier return."""

    def make(original: Any) -> Any:
        try:
            ret = inspect.signature(original).return_annotation
        except (TypeError, ValueError):
            ret = inspect.Signature.empty
        text = ret if isinstance(ret, str) else repr(ret)
        returns_dict = ret is not inspect.Signature.empty and "dict" in text
        return replace_with(returns_dict_fn if returns_dict else returns_tuple_fn)(original)

    return make


# core_algos.py name -> (drop-in, 4-tuple twin); each is also replaced in POLICY_LOSS_REGISTRY
# ("vanilla", "gspo", "sapo", "cispo") by identity.
POLICY_LOSSES = {
    "compute_policy_loss_vanilla": (compute_policy_loss_vanilla, compute_policy_loss_vanilla_tuple),
    "compute_policy_loss_gspo": (compute_policy_loss_gspo, compute_policy_loss_gspo_tuple),
    "compute_policy_loss_sapo": (compute_policy_loss_sapo, compute_policy_loss_sapo_tuple),
    "compute_policy_loss_cispo": (compute_policy_loss_cispo, compute_policy_loss_cispo_tuple),
}


def patch(module: Union[str, types.ModuleType, None] = None) -> PatchHandle:
    """Replace verl's logprob/entropy/KL/policy-loss functions by this module's (see the module docstring).

    Rewrites every loaded ``verl.*`` module that holds them by name and the registry entries
    ``POLICY_LOSS_REGISTRY["vanilla" | "gspo" | "sapo" | "cispo"]``. Call before the actor/engine is
    built, in each worker process. Returns a handle (``undo()``, context manager). Functions the installed verl lacks,
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
    ]
    targets += [Target(ca, name, _make_policy_loss(*fns), _check_policy_loss) for name, fns in POLICY_LOSSES.items()]
    return apply_patch("verl" if module is None else module, targets, label="verl",
                       install_hint="pip install verl", caller="fastrlhf.integrations.verl")

