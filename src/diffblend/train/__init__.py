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

from .config import DIGIT_PROMPTS, FinetuneConfig
from .lora import LORA_TARGETS, add_lora, base_model, load_lora_file, lora_state_dict, save_lora, set_lora_state_dict
from .policy import DiffusionPolicy, unet_denoiser
from .reward import parse_reward_spec, resolve_reward
from .trainer import FinetuneResult, finetune, load_policy

__all__ = [
    "DIGIT_PROMPTS", "FinetuneConfig", "LORA_TARGETS", "add_lora", "base_model", "load_lora_file",
    "lora_state_dict", "save_lora", "set_lora_state_dict", "DiffusionPolicy", "unet_denoiser",
    "parse_reward_spec", "resolve_reward", "FinetuneResult", "finetune", "load_policy",
]
