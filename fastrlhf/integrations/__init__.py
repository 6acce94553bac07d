"""Drop-in replacements for the loss/logprob functions of TRL, verl and OpenRLHF.

One module per trainer, each importable without the trainer installed:

- :mod:`fastrlhf.integrations.trl`: ``selective_log_softmax``, ``entropy_from_logits``,
  ``selective_log_softmax_and_entropy`` (both TRL variants) and TRL 1.x's fused-LM-head
  ``ChunkedLogProbFunction`` (what ``GRPOTrainer``/``DPOTrainer`` call in TRL >= 1.0).
- :mod:`fastrlhf.integrations.verl`: ``logprobs_from_logits``, ``entropy_from_logits(_with_chunking)``,
  ``kl_penalty`` (with the ``"+"`` straight-through variants), ``agg_loss``,
  ``compute_policy_loss_vanilla``.
- :mod:`fastrlhf.integrations.openrlhf`: ``log_probs_from_logits``, ``compute_entropy``,
  ``compute_approx_kl``, ``PolicyLoss``, ``DPOLoss``.

Each function keeps the trainer's signature and semantics (shapes, output dtypes, masking)
and runs on fastrlhf's public ops (``backend="auto"``: Triton on CUDA, native/torch on CPU).
``<module>.patch()`` swaps them into the installed trainer, everywhere it is referenced, and
returns a handle with ``undo()`` (also a context manager); see ``docs/integrations.md``.
Functions the installed version lacks, or has with another signature, are skipped with an
:class:`~fastrlhf.integrations._patch.IntegrationWarning`; ``patch()`` raises ``ImportError``
only when the trainer itself is not installed.

The submodules are not imported here, so ``import fastrlhf`` never imports a trainer.
"""

from ._patch import IntegrationWarning, PatchHandle

__all__ = ["IntegrationWarning", "PatchHandle"]
