"""PPO, DPO and GRPO training on Hugging Face causal LMs, built only on the public ops."""
