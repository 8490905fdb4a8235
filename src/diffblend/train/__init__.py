"""RL fine-tuning of one LoRA adapter per reward (DPOK-style), the adapters that Diffusion Blend blends.

Public API:
    FinetuneConfig, finetune        the run (config dataclass, the loop under accelerate)
    DiffusionPolicy                 a diffusers pipeline seen as a policy (unet, encode, decode)
    add_lora, save_lora, load_lora_file, base_model
                                    LoRA on the attention projections; diffusers LoRA files
    resolve_reward, parse_reward_spec
                                    ``--reward`` (a name or NAME=W,...) -> reward function

Heavy imports (diffusers, peft, accelerate) happen inside the functions that need them.
"""

from __future__ import annotations

from .._lazy import lazy_exports

# name -> submodule: imported on first use (PEP 562), so ``diffblend.train.config`` (the command line
# builds its options from it) does not pull in the trainer, peft helpers and rewards.
_WHERE = {
    "DIGIT_PROMPTS": "config", "FinetuneConfig": "config",
    "LORA_TARGETS": "lora", "add_lora": "lora", "base_model": "lora", "load_lora_file": "lora",
    "lora_state_dict": "lora", "save_lora": "lora", "set_lora_state_dict": "lora",
    "DiffusionPolicy": "policy", "unet_denoiser": "policy",
    "parse_reward_spec": "reward", "resolve_reward": "reward",
    "FinetuneResult": "trainer", "finetune": "trainer", "load_policy": "trainer",
}
__all__ = list(_WHERE)


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals())
