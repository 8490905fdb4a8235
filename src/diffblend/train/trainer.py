"""The fine-tuning loop: rollouts, rewards, then PPO + KL updates on per-prompt advantages (DPOK) or
reward-weighted denoising + KL updates (RWR, ``train/rwr.py``), under accelerate.

Run directory::

    config.json          the resolved FinetuneConfig
    metrics.jsonl        one JSON line per epoch (reward, KL, loss, ...)
    checkpoints/         epoch-NNNNNN.pt: LoRA + optimizer + RNG + epoch (atomic, newest kept)
    adapter.safetensors  the final adapter (diffusers LoRA format), unless an output path is given

The same call works in one process or under ``accelerate launch`` (several processes / GPUs):
each process draws its own prompts and noise (keyed on seed, epoch, process index), gradients
are averaged by accelerate, and only the main process writes files.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from .config import FinetuneConfig
from .dpok import evaluate_transition, per_prompt_advantages, ppo_loss, rollout, step_weight, transition_kl
from .lora import add_lora, base_model, lora_parameters, lora_state_dict, save_lora, set_lora_state_dict
from .policy import DiffusionPolicy
from .rwr import effective_sample_size, rwr_weights, weighted_denoising_loss
from ..core.sampling import map_cond
from .reward import RewardFn, resolve_reward
from .._io import atomic_write_text

__all__ = ["FinetuneResult", "finetune", "sample_generators"]


@dataclass
class FinetuneResult:
    """adapter: path of the saved adapter; epochs: epochs done in total; metrics: this call's rows."""

    adapter: Path
    epochs: int
    metrics: list[dict]


def _key(*parts: int) -> int:
    """A 63-bit seed from integers (a fixed mix, so keys do not depend on Python's hash seed)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 + 0x7F4A7C15) % (2**63 - 1)
    return h


def sample_generators(seed: int, epoch: int, process: int, n: int) -> list[torch.Generator]:
    """One generator per trajectory of (seed, epoch, process): its x_T and its step noise."""
    return [torch.Generator().manual_seed(_key(seed, epoch, process, j)) for j in range(n)]


def _draw_prompts(cfg: FinetuneConfig, epoch: int, process: int) -> list[str]:
    g = torch.Generator().manual_seed(_key(cfg.seed, epoch, process, 10**9))
    idx = torch.randint(len(cfg.prompts), (cfg.prompts_per_epoch,), generator=g).tolist()
    return [cfg.prompts[i] for i in idx for _ in range(cfg.samples_per_prompt)]


def _write_jsonl_prefix(path: Path, keep_epochs: int) -> None:
    """Keep the metric rows of the first ``keep_epochs`` epochs (a resumed run redoes the others)."""
    if not path.exists():
        return
    kept = []
    for ln in path.read_text().splitlines():
        try:
            row = json.loads(ln)
        except ValueError:  # blank, or the torn last line of a run killed while appending
            continue
        if row.get("epoch", 0) < keep_epochs:
            kept.append(ln)
    atomic_write_text(path, "".join(ln + "\n" for ln in kept))


def _flat_info(info: dict | None, prefix: str = "") -> dict:
    """Flatten a reward's info (a weighted reward nests ``{"components": {name: scores}}``)."""
    out = {}
    for k, v in (info or {}).items():
        key = k if k != "components" else ""
        if isinstance(v, dict):
            out.update(_flat_info(v, f"{prefix}{key}/" if key else prefix))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_policy(model: str | None, device: torch.device | str, decode_chunk: int | None = None) -> DiffusionPolicy:
    """The policy for ``model``: a diffusers pipeline folder of any supported family (SD 1.5, SDXL,
    SD3; hub ids need network access), or None for the embedded digits model. Loading goes through
    the same loader as ``diffblend generate``."""
    from ..generation import load_pipeline

    return DiffusionPolicy.from_pipeline(load_pipeline(model, device=device), device=device,
                                         decode_chunk=decode_chunk)


def _resume_state(cfg: FinetuneConfig, run_dir: Path, ckpt_dir: Path, resume: bool) -> tuple[int, dict | None]:
    """(first epoch, checkpoint state or None), after checking that a resumed run has the same config."""
    start_epoch, state = 0, None
    if resume:
        last = latest_checkpoint(ckpt_dir)
        if last is None:
            raise ValueError(f"--resume: run dir {str(run_dir)!r} has no checkpoint to continue from; "
                             f"drop --resume to start a new run there")
        else:
            state = load_checkpoint(last)
            saved = dict(state["config"])
            saved["epochs"] = cfg.epochs
            if FinetuneConfig.from_dict(saved).to_dict() != cfg.to_dict():
                diff = [k for k, v in cfg.to_dict().items() if saved.get(k) != v]
                raise ValueError(f"--resume: the config differs from the checkpoint's in {diff}; "
                                 f"use the same settings (only epochs may change) or a new run dir")
            start_epoch = int(state["epoch"])
            if cfg.epochs < start_epoch:
                raise ValueError(f"--resume: epochs must be >= {start_epoch}, the epochs the checkpoint {last.name} "
                                 f"has done; got {cfg.epochs}")
    elif latest_checkpoint(ckpt_dir) is not None:
        raise ValueError(f"run dir {str(run_dir)!r} already has checkpoints; pass --resume to continue it "
                         f"or choose a new run dir")
    return start_epoch, state


def _with_adapter(cfg: FinetuneConfig, policy: DiffusionPolicy, acc, state: dict | None):
    """The network on the device with a fresh (or the checkpoint's) LoRA adapter: (network, LoRA
    parameters, AdamW, the shuffles' generator)."""
    unet = policy.unet.to(acc.device)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    add_lora(unet, cfg.rank, cfg.lora_alpha, generator=torch.Generator().manual_seed(_key(cfg.seed, 7)))
    params = lora_parameters(unet)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    train_gen = torch.Generator().manual_seed(_key(cfg.seed, 11))  # shuffles and timestep subsets
    if state is not None:
        set_lora_state_dict(unet, state["lora"])
        opt.load_state_dict(state["optimizer"])
        train_gen.set_state(state["rng"])
    return unet, params, opt, train_gen


def _scored_rollout(run: _Run, reward_fn, monitors: dict, epoch: int):
    """This process's rollouts of the epoch and their rewards (gathered over processes, checked finite)."""
    cfg, acc = run.cfg, run.acc
    prompts = _draw_prompts(cfg, epoch, acc.process_index)
    gens = sample_generators(cfg.seed, epoch, acc.process_index, len(prompts))
    ro = rollout(run.plain_model, run.policy, prompts, gens, num_steps=cfg.num_steps, **run.g_kw)
    # rewards (the advantages are per prompt)
    with torch.no_grad():
        rewards, info = reward_fn(ro.images, prompts, {"epoch": epoch})
        for name, fn in monitors.items():
            info = {**(info or {}), f"monitor/{name}": fn(ro.images, prompts, {"epoch": epoch})[0]}
    rewards = torch.as_tensor(rewards, dtype=torch.float32).reshape(-1).cpu()
    all_rewards = acc.gather(rewards.to(acc.device)).cpu()  # every process checks all: all stop together
    if not torch.isfinite(all_rewards).all():  # NaN advantages would turn every LoRA weight into NaN, silently
        bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
        raise ValueError(f"non-finite reward at epoch {epoch} (this process: rollouts {bad}, prompts "
                         f"{[prompts[i] for i in bad]}); the reward {cfg.reward!r} or the model gave NaN / inf")
    return prompts, ro, rewards, all_rewards, info


def _metrics_row(epoch: int, all_rewards, rewards, stats: dict, info, acc, t0: float) -> dict:
    """One metrics.jsonl row: rewards, the update's means and the reward info's means, over processes."""
    row = {"epoch": epoch, "reward_mean": all_rewards.mean().item(), "reward_std": all_rewards.std().item(),
           **{k: acc.gather(torch.tensor([v], device=acc.device)).mean().item() for k, v in stats.items()},
           "seconds": time.perf_counter() - t0}
    for k, v in _flat_info(info).items():
        if isinstance(v, torch.Tensor) and v.numel() == rewards.numel():
            row[f"{k}_mean"] = acc.gather(v.float().reshape(-1).to(acc.device)).mean().item()
    return row


def _record(cfg: FinetuneConfig, run_dir: Path, row: dict, done: int, end_epoch: int, unet, opt, gen) -> None:
    """Append the metrics row; checkpoint (LoRA, optimizer, the shuffles' RNG, config) every
    cfg.checkpoint_every epochs and at the end."""
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    if done % cfg.checkpoint_every == 0 or done == cfg.epochs or done == end_epoch:
        ckpt_dir = run_dir / "checkpoints"
        save_checkpoint(ckpt_dir, done, {"lora": lora_state_dict(unet), "optimizer": opt.state_dict(),
                                         "rng": gen.get_state(), "config": cfg.to_dict()})
        prune_checkpoints(ckpt_dir, cfg.keep_checkpoints)


def with_default_prompts(cfg: FinetuneConfig) -> FinetuneConfig:
    """``cfg`` with its prompts filled in from the embedded model's default prompts when it has none."""
    import dataclasses

    from ..generation import embedded_model

    if cfg.prompts:
        return cfg
    embedded = embedded_model(cfg.model)
    if embedded is None or not embedded.prompts:
        raise ValueError(f"prompts: the model {cfg.model!r} has no default prompts; give the prompts to train on "
                         f"(--prompts)")
    return dataclasses.replace(cfg, prompts=tuple(embedded.prompts))


def _accelerator(cfg: FinetuneConfig, accelerator=None):
    """The given accelerator, or one on the GPU if any (cfg.mixed_precision).

    Raises:
        ValueError: if accelerate's gradient accumulation is set (the trainer does not use it), or if
            a given accelerator's mixed precision is not ``cfg.mixed_precision`` (the run's config.json
            would record a precision the run did not use).
    """
    import os

    from accelerate import Accelerator

    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")  # set by `accelerate launch` (flag or config file)
    if accelerator is None and launched and launched != cfg.mixed_precision:
        raise ValueError(f"accelerate launch asks for mixed precision {launched!r} but the run's mixed_precision is "
                         f"{cfg.mixed_precision!r}; pass --mixed-precision {launched} (it is recorded in "
                         f"config.json), or launch with --mixed_precision {cfg.mixed_precision}")
    acc = accelerator or Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision)
    if getattr(acc, "gradient_accumulation_steps", 1) != 1:  # acc.backward would only divide each loss by it
        raise ValueError(f"accelerate's gradient_accumulation_steps = {acc.gradient_accumulation_steps} is not used "
                         f"by this trainer; set the trajectories per optimizer step with minibatch_size "
                         f"(--minibatch-size) and launch with gradient_accumulation_steps = 1")
    precision = str(getattr(acc, "mixed_precision", "no"))
    if precision != cfg.mixed_precision:
        raise ValueError(f"the accelerator's mixed_precision is {precision!r} but cfg.mixed_precision is "
                         f"{cfg.mixed_precision!r}; make them agree (e.g. FinetuneConfig(mixed_precision="
                         f"{precision!r}), or launch accelerate with --mixed_precision {cfg.mixed_precision})")
    return acc


@dataclass
class _Run:
    """What a fine-tuning run holds from its start to its end (built by :func:`_start`)."""

    cfg: FinetuneConfig
    policy: DiffusionPolicy
    acc: Any  # accelerate.Accelerator
    unet: torch.nn.Module  # the network with its LoRA adapter
    ddp_unet: torch.nn.Module  # the same network as accelerate prepared it (DDP under several processes)
    opt: Any  # AdamW over the LoRA parameters, prepared by accelerate
    params: list  # the LoRA parameters (gradient clipping)
    gen: torch.Generator  # the shuffles and timestep subsets (checkpointed)
    g_kw: dict  # the step's stochasticity, the guidance scale and the unconditional conditioning
    n_train: int  # transitions trained per trajectory

    @property
    def plain_model(self):
        """The network's denoiser without the DDP wrapper: no-grad rollouts and the base."""
        return self.policy.denoiser(self.unet)

    @property
    def train_model(self):
        """The network's denoiser through the DDP wrapper: the updates (gradients all-reduced)."""
        return self.policy.denoiser(self.ddp_unet)


def _start(cfg: FinetuneConfig, policy: DiffusionPolicy, acc, state: dict | None) -> _Run:
    """The run's state: the adapter on the network, the optimizer, both prepared by accelerate."""
    unet, params, opt, train_gen = _with_adapter(cfg, policy, acc, state)
    ddp_unet, opt = acc.prepare(unet, opt)
    uncond = map_cond(policy.uncond(), lambda v: v.to(acc.device)) if cfg.guidance_scale != 1.0 else None
    # the step's stochasticity: DDIM's eta, or the flow SDE's noise level for flow-matching models
    g_kw = dict(eta=cfg.noise_level if policy.is_flow else cfg.eta, guidance_scale=cfg.guidance_scale,
                uncond=uncond)
    return _Run(cfg, policy, acc, unet, ddp_unet, opt, params, train_gen, g_kw,
                n_train=max(1, int(round(cfg.timestep_fraction * cfg.num_steps))))


def _prepare_run_dir(cfg: FinetuneConfig, run_dir: Path, output, resume: bool) -> tuple[int, dict | None, Path]:
    """(first epoch, checkpoint state or None, adapter path), every check done before any model loads."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run dir {str(run_dir)!r} is a file, not a folder; choose a folder for the run")
    start_epoch, state = _resume_state(cfg, run_dir, run_dir / "checkpoints", resume)
    out = Path(output) if output is not None else run_dir / "adapter.safetensors"
    if out.suffix != ".safetensors":  # before any training: save_lora would refuse it at the very end
        raise ValueError(f"the adapter path must end in .safetensors, got {str(out)!r}")
    return start_epoch, state, out


def finetune(
    cfg: FinetuneConfig,
    run_dir: str | os.PathLike,
    *,
    policy: DiffusionPolicy | None = None,
    reward_fn: RewardFn | None = None,
    resume: bool = False,
    output: str | os.PathLike | None = None,
    progress: bool = True,
    accelerator=None,
    stop_after: int | None = None,
) -> FinetuneResult:
    """Fine-tune one LoRA adapter with DPOK for ``cfg.reward`` (a MORL oracle for a weighted reward).

    Args:
        cfg: the run's configuration.
        run_dir: folder of config, metrics and checkpoints (created).
        policy: the model; default :func:`load_policy` (cfg.model). Its UNet gets the adapter.
        reward_fn: default ``resolve_reward(cfg.reward)`` (the ``diffblend.rewards`` registry).
        resume: continue from the newest checkpoint in ``run_dir`` (the config must match, except
            ``epochs``, which may grow). Without it, a run dir with checkpoints is refused.
        output: path of the final adapter (.safetensors); default ``run_dir/adapter.safetensors``.
        accelerator: an ``accelerate.Accelerator`` to run under (default: one made for
            ``cfg.mixed_precision``); its mixed precision must be ``cfg.mixed_precision``.
        stop_after: stop after this many epochs of this call (for tests of a killed run).

    Returns:
        :class:`FinetuneResult`.
    """
    run_dir = Path(run_dir)
    if cfg.algorithm == "filtered":
        if policy is not None or reward_fn is not None or accelerator is not None:
            raise ValueError("algorithm 'filtered' loads the colour model and its rewards itself and runs on the CPU: "
                             "policy, reward_fn and accelerator must be None")
        return _finetune_filtered(cfg, run_dir, resume=resume, output=output, progress=progress,
                                  stop_after=stop_after)
    cfg = with_default_prompts(cfg)
    acc = _accelerator(cfg, accelerator)
    start_epoch, state, out = _prepare_run_dir(cfg, run_dir, output, resume)
    # before the model: fail fast on a bad name
    reward_fn = reward_fn or resolve_reward(cfg.reward, device=acc.device, calibration=cfg.calibration)
    monitors = {m: resolve_reward(m, device=acc.device) for m in cfg.monitor}
    policy = policy or load_policy(cfg.model, acc.device, cfg.decode_chunk)
    run = _start(cfg, policy, acc, state)
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.json")
        _write_jsonl_prefix(run_dir / "metrics.jsonl", start_epoch)
    end_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, start_epoch + stop_after)
    rows = _train(run, run_dir, reward_fn, monitors, range(start_epoch, end_epoch), progress)
    if acc.is_main_process and end_epoch == cfg.epochs:
        save_lora(run.unet, out, pipeline_class=policy.pipeline_class, component=policy.component)
    acc.wait_for_everyone()
    return FinetuneResult(adapter=out, epochs=end_epoch, metrics=rows)


def _finetune_filtered(cfg: FinetuneConfig, run_dir: Path, *, resume: bool, output, progress: bool,
                       stop_after: int | None) -> FinetuneResult:
    """``algorithm="filtered"``: the embedded model's own best-of-n trainer on its scene renderer (the colour
    model's, ``zoo/colour/finetune.py``, registered as ``DefaultModel.filtered_finetune``); its metrics rows
    (step, loss, kept, all: the reward of the kept scenes and of all candidates) are this call's."""
    from ..generation import embedded_model

    model = embedded_model(cfg.model)
    if model is None or model.filtered_finetune is None:
        raise ValueError(f"model must be an embedded model with a scene renderer (colour; none = the default, if it is "
                         f"one) with algorithm 'filtered', which draws its candidates from that renderer; got "
                         f"{cfg.model!r}")
    out = Path(output) if output is not None else run_dir / "adapter.safetensors"
    summary = model.filtered_finetune(cfg, run_dir, out, resume=resume, progress=progress, stop_after=stop_after)
    return FinetuneResult(adapter=out, epochs=summary["steps"], metrics=summary["metrics"])


def _train(run: _Run, run_dir: Path, reward_fn, monitors: dict, epochs: range, progress: bool) -> list[dict]:
    """The epochs of this call; returns their metrics rows (the main process also records them)."""
    from tqdm.auto import tqdm

    cfg, acc = run.cfg, run.acc
    bar = tqdm(total=cfg.epochs, initial=epochs.start, desc=f"finetune {cfg.reward}",
               disable=not (progress and acc.is_main_process), dynamic_ncols=True)
    rows: list[dict] = []
    for epoch in epochs:
        t0 = time.perf_counter()
        # 1. rollouts with the current policy (stochastic steps: every transition has a log-prob), rewards
        run.unet.eval()
        prompts, ro, rewards, all_rewards, info = _scored_rollout(run, reward_fn, monitors, epoch)
        if cfg.algorithm == "rwr":  # each image's weight in the denoising loss
            signal = rwr_weights(rewards, prompts, cfg.rwr_beta, cfg.rwr_min_ess).to(acc.device)
        else:
            signal = per_prompt_advantages(rewards, prompts).to(acc.device)
        # 2. policy updates on the stored transitions (DPOK) or images (RWR)
        run.unet.train()
        stats = _update(run, ro, signal)
        if cfg.algorithm == "rwr":
            stats["ess"] = effective_sample_size(signal)
        # 3. log, checkpoint
        row = _metrics_row(epoch, all_rewards, rewards, stats, info, acc, t0)
        rows.append(row)
        if acc.is_main_process:
            _record(cfg, run_dir, row, epoch + 1, epochs.stop, run.unet, run.opt, run.gen)
        acc.wait_for_everyone()
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward_mean']:.4g}", kl=f"{row['kl']:.3g}")
    bar.close()
    return rows


class _Means:
    """Running means of the update's statistics."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, **values: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: v / self.counts[k] for k, v in self.sums.items()}


def _update(run: _Run, ro, signal: torch.Tensor) -> dict:
    """One epoch of updates on the rollouts ``ro``: cfg.inner_epochs passes of minibatches; per minibatch,
    the loss summed over ``run.n_train`` random steps of the grid, one AdamW step with gradient clipping.
    DPOK: ``signal`` are the advantages, the steps the trajectories' stored transitions; RWR: ``signal``
    are the images' weights, the steps grid points where the final images are noised afresh.

    Returns the epoch's means: loss, pg (DPOK's policy-gradient part) or regression (RWR's weighted
    denoising loss), kl_eps (sum_d (eps_theta - eps_pre)^2 per step), kl (the path KL estimate
    sum_t KL(p_theta(.|x_t) || p_pre(.|x_t)) in nats per trajectory), clipfrac and approx_kl (DPOK),
    grad_norm.
    """
    cfg, policy = run.cfg, run.policy
    if cfg.algorithm == "rwr":
        return _rwr_update(run, ro, signal)
    B, N = ro.latents.shape[1], ro.latents.shape[0] - 1
    pairs = list(policy.pairs(ro.grid if ro.grid is not None else ro.timesteps))
    weights = [step_weight(policy, t, prev_t, run.g_kw["eta"]) if cfg.step_weighting == "pred" else 1.0
               for t, prev_t in pairs]
    means = _Means()
    for rows, steps in _minibatches(run, B, N, ro.latents.device):
        for k, i in enumerate(steps):
            # accumulate over the trajectory's steps; all-reduce the gradients once, at the last
            last = k == len(steps) - 1
            means.add(**_step_loss(run, ro, signal, rows, i, pairs[i], weights[i], len(steps), sync=last))
        _optimizer_step(run, means)
    return means.means()


def _minibatches(run: _Run, B: int, N: int, device):
    """The epoch's minibatches, drawn from ``run.gen``: per pass (cfg.inner_epochs) a permutation of the B
    rollouts cut into minibatches, each with its ``run.n_train`` random steps of the N; yields (rows, steps)."""
    for _ in range(run.cfg.inner_epochs):
        perm = torch.randperm(B, generator=run.gen)
        for start in range(0, B, run.cfg.minibatch_size):
            rows = perm[start:start + run.cfg.minibatch_size].to(device)
            yield rows, torch.randperm(N, generator=run.gen)[:run.n_train].tolist()


def _optimizer_step(run: _Run, means: _Means) -> None:
    """Clip the accumulated gradients (their norm goes to ``means``), one AdamW step, clear them."""
    means.add(grad_norm=run.acc.clip_grad_norm_(run.params, run.cfg.max_grad_norm))
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _accumulating(acc, model):
    """A backward that is not the last of its optimizer step: no gradient all-reduce (DDP's ``no_sync``) and
    ``sync_gradients`` off, which is what keeps accelerate from stepping a DeepSpeed engine on it (it runs
    ``engine.step()`` after every backward whose ``sync_gradients`` is true, as in ``Accelerator.accumulate``)."""
    state = acc.gradient_state
    before = state.sync_gradients
    state._set_sync_gradients(False)
    try:
        with acc.no_sync(model):
            yield
    finally:
        state._set_sync_gradients(before)


def _step_loss(run: _Run, ro, adv, rows, i: int, pair, weight: float, n_steps: int, sync: bool) -> dict:
    """Back-propagate the loss of transition ``i`` of the trajectories ``rows`` (divided by the
    ``n_steps`` trained per trajectory); returns its statistics. ``sync``: all-reduce the gradients."""
    cfg, policy, acc, g_kw = run.cfg, run.policy, run.acc, run.g_kw
    (t, prev_t), N = pair, ro.latents.shape[0] - 1
    x_t, x_prev = ro.latents[i][rows], ro.latents[i + 1][rows]
    cond = map_cond(ro.cond, lambda v: v[rows])
    with torch.no_grad(), base_model(run.unet):
        pre, eps_pre = evaluate_transition(run.plain_model, policy, x_t, t, prev_t, x_prev, cond, **g_kw)
    with contextlib.nullcontext() if sync else _accumulating(acc, run.ddp_unet):
        cur, eps = evaluate_transition(run.train_model, policy, x_t, t, prev_t, x_prev, cond, **g_kw)
        pg, st = ppo_loss(cur.log_prob, ro.log_probs[i][rows], adv[rows], cfg.clip_range, cfg.adv_clip_max, weight)
        kl_eps = ((eps - eps_pre) ** 2).flatten(1).sum(1).mean()
        loss = pg + cfg.kl * kl_eps
        acc.backward(loss / n_steps)
    return dict(loss=loss.item(), pg=pg.item(), kl_eps=kl_eps.item(),
                kl=transition_kl(cur.mean.detach(), pre.mean, cur.std).mean().item() * N,
                clipfrac=st["clipfrac"], approx_kl=st["approx_kl"])


def _rwr_update(run: _Run, ro, weights: torch.Tensor) -> dict:
    """RWR's epoch of updates (see :func:`_update`): first every draw of the epoch (per pass and minibatch,
    ``run.n_train`` grid points, each with fresh noise for its images) and the anchor of each, the prediction
    of the model that drew the images (``train/rwr.py``), then one AdamW step per minibatch."""
    policy = run.policy
    B, N = ro.latents.shape[1], ro.latents.shape[0] - 1
    pairs = list(policy.pairs(ro.grid if ro.grid is not None else ro.timesteps))
    x0 = ro.latents[-1]
    plan = []
    for rows, steps in _minibatches(run, B, N, x0.device):
        draws = []
        for i in steps:
            noise = torch.randn((len(rows), *x0.shape[1:]), generator=run.gen, dtype=x0.dtype).to(x0.device)
            x_t = policy.add_noise(x0[rows], noise, pairs[i][0].to(x0.device))
            draws.append((i, x_t, noise, _rwr_eps(run, ro, rows, pairs[i], x_t)))
        plan.append((rows, draws))
    means = _Means()
    for rows, draws in plan:
        for k, (i, x_t, noise, anchor) in enumerate(draws):
            means.add(**_rwr_step_loss(run, ro, weights, rows, i, pairs[i], x_t, noise, anchor, len(draws),
                                       sync=k == len(draws) - 1))
        _optimizer_step(run, means)
    return means.means()


@torch.no_grad()
def _rwr_eps(run: _Run, ro, rows, pair, x_t: torch.Tensor) -> torch.Tensor:
    """The current model's guided noise estimate at the noised images ``x_t`` of the grid step ``pair``."""
    cond = map_cond(ro.cond, lambda v: v[rows])
    return evaluate_transition(run.plain_model, run.policy, x_t, pair[0], pair[1], x_t, cond, **run.g_kw)[1]


def _rwr_step_loss(run: _Run, ro, weights, rows, i: int, pair, x_t, noise, anchor, n_steps: int, sync: bool) -> dict:
    """RWR: back-propagate the anchored weighted denoising loss of the images ``rows`` noised at grid point
    ``i`` (plus the KL term; divided by the ``n_steps`` points drawn); returns its statistics."""
    cfg, policy, acc, g_kw = run.cfg, run.policy, run.acc, run.g_kw
    (t, prev_t), N = pair, ro.latents.shape[0] - 1
    cond = map_cond(ro.cond, lambda v: v[rows])
    # evaluate_transition's step is only read for its mean and std (the KL estimate): x_prev is a placeholder
    with torch.no_grad(), base_model(run.unet):
        pre, eps_pre = evaluate_transition(run.plain_model, policy, x_t, t, prev_t, x_t, cond, **g_kw)
    with contextlib.nullcontext() if sync else _accumulating(acc, run.ddp_unet):
        cur, eps = evaluate_transition(run.train_model, policy, x_t, t, prev_t, x_t, cond, **g_kw)
        regression = weighted_denoising_loss(eps, noise, weights[rows], anchor=anchor)
        kl_eps = ((eps - eps_pre) ** 2).flatten(1).sum(1).mean()
        loss = regression + cfg.kl * kl_eps
        acc.backward(loss / n_steps)
    return dict(loss=loss.item(), regression=regression.item(), kl_eps=kl_eps.item(),
                kl=transition_kl(cur.mean.detach(), pre.mean, cur.std).mean().item() * N)
