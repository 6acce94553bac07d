"""Former home of what the trainers share, split by idea; these names stay importable from here.

- :mod:`fastrlhf.algos.trainer`: ``TrainConfig``, ``Trainer`` (the one update loop, rollouts,
  checkpoints), RNG state, ``supervised_finetune``.
- :mod:`fastrlhf.algos.batching`: ``SequenceBatch``, ``pack_sequences``, ``micro_batches``,
  ``cut_at_eos``, ``encode_prompt`` / ``encode_completion``.
- :mod:`fastrlhf.algos.models`: ``load_causal_lm``, ``unwrap_model``, ``output_head``,
  ``forward_hidden``, ``apply_lora``, ``freeze``, ``head_op``.
- :mod:`fastrlhf.algos.rewards`: ``call_reward_fn``, ``reward_model_fn``, ``load_reward_fn``.
"""

from .batching import (  # noqa: F401
    IGNORE_INDEX,
    SequenceBatch,
    cut_at_eos,
    encode_completion,
    encode_prompt,
    micro_batches,
    pack_sequences,
)
from .models import (  # noqa: F401
    apply_lora,
    attn_implementation,
    check_fusable,
    forward_hidden,
    freeze,
    head_op,
    load_causal_lm,
    output_head,
    position_ids_from_mask,
    unwrap_model,
)
from .rewards import RewardFn, call_reward_fn, load_reward_fn, reward_model_fn  # noqa: F401
from .trainer import (  # noqa: F401
    TrainConfig,
    Trainer,
    all_checkpoints,
    get_rng_state,
    latest_checkpoint,
    peak_memory_mb,
    seed_everything,
    set_rng_state,
    supervised_finetune,
)
