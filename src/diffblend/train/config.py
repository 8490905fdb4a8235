"""The resolved configuration of one RL fine-tuning run (written to ``config.json`` in the run dir)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .._fields import setting
from .._io import atomic_write_text

__all__ = ["FinetuneConfig", "DIGIT_PROMPTS"]

DIGIT_PROMPTS = tuple(str(d) for d in range(10))  # the embedded default model's prompts

# The settings that algorithm "filtered" reads (zoo/colour/finetune.py: epochs are its steps, prompts_per_epoch
# its prompts per step, samples_per_prompt its candidates per prompt).
FILTERED_SETTINGS = frozenset({"reward", "kl", "model", "calibration", "rank", "epochs", "prompts_per_epoch",
                               "samples_per_prompt", "algorithm", "lr", "weight_decay", "max_grad_norm", "seed",
                               "checkpoint_every"})


@dataclass
class FinetuneConfig:
    """RL fine-tuning (DPOK, or reward-weighted regression; or best-of-n filtering of an embedded model's rendered
    scenes) of one LoRA adapter for one reward (or one weighted reward, MORL).

    Every field has its unit. "epoch" = one round of rollouts followed by the policy updates on them.
    """

    # -- what to train ------------------------------------------------------------------------
    reward: str = setting("jpeg_compressibility", "reward name (jpeg_compressibility, legibility, boldness, ...), "
                          "or NAME=W,NAME=W (w >= 0, sum 1) for a MORL oracle")
    kl: float = setting(1.0, "alpha >= 0, weight of the KL term alpha * sum_d (eps_theta - eps_pre)^2 per step "
                             "(per reward unit)")
    model: str | None = setting(None, "a diffusers pipeline folder, or an embedded model by name (colour, digits); "
                                      "none = the default embedded model")
    prompts: tuple[str, ...] = setting((), "prompts drawn uniformly for the rollouts (default: an embedded model's "
                                           "default prompts; a pipeline folder needs them)")
    calibration: str | None = setting(None, "a reward calibration manifest (diffblend calibrate): train on each "
                                            "reward standardised against the base model's images, (r - mean) / std, "
                                            "so the weights of NAME=W,... mean the same on every reward")
    monitor: tuple[str, ...] = setting((), "rewards only logged on the rollouts (e.g. legibility, to see reward "
                                           "hacking)")
    # -- adapter --------------------------------------------------------------------------------
    rank: int = setting(4, "LoRA rank r")
    lora_alpha: float | None = setting(None, "peft lora_alpha (adapter scale lora_alpha / r); none = r")
    # -- rollouts -------------------------------------------------------------------------------
    epochs: int = setting(30, "number of rollout + update rounds")
    prompts_per_epoch: int = setting(4, "distinct prompt draws per epoch and process")
    samples_per_prompt: int = setting(4, "images per prompt (the group of the per-prompt advantage), >= 2")
    num_steps: int = setting(20, "sampling steps per rollout (DDIM, or the flow SDE)")
    eta: float = setting(1.0, "DDIM eta in (0, 1] (1 = stochastic; every step needs a log-prob)")
    noise_level: float = setting(0.7, "flow-matching models (SD3, Flux): the SDE's noise level a > 0 (Flow-GRPO: "
                                      "0.7); eta is DDIM's")
    guidance_scale: float = setting(2.0, "CFG scale of the rollouts, as at inference (1 = none; 2 = the digits "
                                         "default)")
    # -- policy update (PPO-clipped policy gradient + KL to the frozen base) ---------------------
    algorithm: str = setting("dpok", "dpok: PPO-clipped policy gradient on the stored transitions (DPOK / DDPO); "
                                     "rwr: reward-weighted regression, the denoising loss on the epoch's own images "
                                     "weighted by exp(r / rwr_beta) within each prompt's group (both with the KL term); "
                                     "filtered: an embedded model with a scene renderer (colour): each epoch "
                                     "renders samples_per_prompt scenes for each of prompts_per_epoch prompts of its "
                                     "default form, keeps the best under the reward and takes one step of the base's "
                                     "own loss on them (best of n, RAFT; zoo/colour/finetune.py): one epoch = one "
                                     "step, kl must be 0 and the rollout settings stay at their defaults",
                             choices=("dpok", "rwr", "filtered"))
    rwr_beta: float = setting(0.5, "rwr: temperature beta > 0 of the weights exp(r / beta), in reward units (one "
                                   "base sd under --calibration); each epoch tilts the model towards p exp(r / beta)")
    rwr_min_ess: float = setting(0.0, "rwr: a trust region, in [0, 1): a prompt's group whose weights would have an "
                                      "effective sample size below this gets the smallest larger beta that reaches "
                                      "it (0 = off)")
    inner_epochs: int = setting(1, "passes over each epoch's rollouts")
    minibatch_size: int = setting(16, "trajectories per optimizer step (16 = the whole epoch's batch at the "
                                      "default sizes: one step per epoch)")
    timestep_fraction: float = setting(1.0, "fraction of the num_steps transitions trained per trajectory, (0, 1] "
                                                 "(rwr: of the grid points each image is noised at per update)")
    clip_range: float = setting(1e-4, "PPO ratio clip epsilon (DDPO's value: log-probs sum over many dimensions)")
    step_weighting: str = setting("pred", "pred: scale step t's policy-gradient loss by sigma_t / |d mean / d pred| "
                                          "(prediction units); none: plain DDPO", choices=("pred", "none"))
    adv_clip_max: float = setting(5.0, "advantages clipped to [-adv_clip_max, adv_clip_max], in reward std units")
    lr: float = setting(1e-2, "AdamW learning rate (the digits model's adapters; SD-size models want 1e-4 or less)")
    weight_decay: float = setting(1e-4, "AdamW decoupled weight decay")
    adam_betas: tuple[float, float] = setting((0.9, 0.999), "AdamW betas (beta1, beta2)")
    max_grad_norm: float = setting(1.0, "gradient clipping (L2 norm over the LoRA parameters)")
    # -- bookkeeping ----------------------------------------------------------------------------
    seed: int = setting(0, "seeds the adapter init, the rollout noise (per epoch, process, sample) and the shuffles")
    checkpoint_every: int = setting(5, "epochs between checkpoints (the last epoch is always saved)")
    keep_checkpoints: int = setting(2, "newest checkpoints kept on disk")
    mixed_precision: str = setting("no", "accelerate's autocast of the updates (the LoRA weights stay float32)",
                                   choices=("no", "bf16", "fp16"))
    gradient_checkpointing: bool = setting(False, "recompute the network's activations in the backward pass "
                                                  "(enable_gradient_checkpointing: memory for compute)")
    decode_chunk: int | None = setting(None, "decode this many latents at a time (none: the whole batch)")
    extra: dict = setting(default_factory=dict, help="free-form notes recorded with the run (not used by training)")

    def __post_init__(self) -> None:
        self.prompts = tuple(str(p) for p in self.prompts)
        self.monitor = tuple(str(m) for m in self.monitor)
        self.adam_betas = tuple(float(b) for b in self.adam_betas)  # type: ignore[assignment]
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field out of its allowed range."""
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        need(isinstance(self.reward, str) and bool(self.reward.strip()), "reward", "a reward name or NAME=W,...")
        need(self.kl >= 0, "kl", ">= 0")
        need(self.rank >= 1, "rank", ">= 1")
        need(self.lora_alpha is None or self.lora_alpha > 0, "lora_alpha", "> 0 or None")
        for name in ("epochs", "prompts_per_epoch", "num_steps", "inner_epochs", "minibatch_size",
                     "checkpoint_every", "keep_checkpoints"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "an int >= 1")
        need(self.samples_per_prompt >= 2, "samples_per_prompt", ">= 2 (advantages are normalised per prompt)")
        need(0.0 < self.eta <= 1.0, "eta", "in (0, 1] (a deterministic step has no log-prob)")
        need(self.guidance_scale >= 0, "guidance_scale", ">= 0")
        need(0.0 < self.noise_level, "noise_level", "> 0 (the flow SDE; 0 is the deterministic ODE, without log-probs)")
        need(isinstance(self.gradient_checkpointing, bool), "gradient_checkpointing", "True or False")
        need(self.decode_chunk is None or (isinstance(self.decode_chunk, int) and self.decode_chunk >= 1),
             "decode_chunk", "an int >= 1 or None")
        need(0.0 < self.timestep_fraction <= 1.0, "timestep_fraction", "in (0, 1]")
        need(self.clip_range > 0, "clip_range", "> 0")
        for f in fields(self):  # the fields declared with their choices (step_weighting, mixed_precision)
            if "choices" in f.metadata:
                need(getattr(self, f.name) in f.metadata["choices"], f.name,
                     "one of " + ", ".join(map(repr, f.metadata["choices"])))
        need(self.adv_clip_max > 0, "adv_clip_max", "> 0")
        need(self.rwr_beta > 0, "rwr_beta", "> 0")
        need(0.0 <= self.rwr_min_ess < 1.0, "rwr_min_ess", "in [0, 1)")
        need(self.lr > 0, "lr", "> 0")
        if self.algorithm == "filtered":
            need(self.kl == 0, "kl", "0 with algorithm 'filtered' (no KL term: it trains on the base's own kind of "
                                     "scenes)")
            for f in fields(self):  # a setting the filtered trainer does not read must not look as if it did
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                if f.name not in FILTERED_SETTINGS and getattr(self, f.name) != default:
                    need(False, f.name, f"left at its default {default!r} with algorithm 'filtered' (unused by it)")
        need(self.weight_decay >= 0, "weight_decay", ">= 0")
        need(self.max_grad_norm > 0, "max_grad_norm", "> 0")

    @property
    def batch_size(self) -> int:
        """Trajectories per epoch and process."""
        return self.prompts_per_epoch * self.samples_per_prompt

    # -- files ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["prompts"], d["adam_betas"], d["monitor"] = list(self.prompts), list(self.adam_betas), list(self.monitor)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FinetuneConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config has unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def save(self, path: str | os.PathLike) -> None:
        """Write as JSON, atomically."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> FinetuneConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
