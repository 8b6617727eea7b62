"""SoCo: learn one importance score per singular component, all modules competing for one budget.

Student. Each factorised linear computes ((x·B_fullᵀ) ⊙ g(m))·A_fullᵀ with A_full = UΣ and
B_full = VᵀS⁻¹ from the whitened SVD (frozen) and a learnable score m per component (init 1).
g(m) = relu(m) in the forward pass with a straight-through (identity) gradient: a component
pushed below zero still feels the distillation gradient and can come back (plain relu gates,
once cut, never do). Only components up to the module's break-even rank in·out/(in+out) are
trained: a module keeping more is stored dense, so the student costs at most the dense model.

Ranking. The global threshold (`engine.model.rank_budget.allocate_ranks`, the rule bake and the
loader use) ranks components by key = relu(m)·(1 + PRIOR·u), u = SVD-LLM's uniform-rank
priority: with all m = 1 the keep set is exactly SVD-LLM's, and learning moves away from it.
The keys are what bake stores as `X.score`; relu(m) is the mask folded into A.

Losses.
  L_inc = KL(teacher ‖ student) of next-token distributions, mean over tokens; teacher = the
          dense model, on windows of the calibration text (never held-out text).
  L_dec = relu(P(m) / P_target − 1), P(m) = Σ_modules (out + in)·#{i: m_i > 0}, the parameters of
          the components still on (so the ratio read in training is the one bake meets);
          P_target = (1 − ratio)·P_dense. Its gradient is that of Σ (out + in)·clamp(m_i, 0, 1)
          over the components outside the current keep set only (straight-through): pressure
          on every score alike shrank all σ and raised the KL to 1.5 nats before any component
          reached zero; aimed at the would-be-cut ones, they reach zero while the rest hold.
  L_sp  = L1 on the scores outside the keep set, applied as a proximal step sized so they reach
          exact zero at the last step.
Stages (one run, Adam on m, lr 3e-2):
  1. compression, steps [0, s1): L_inc + λ(t)·L_dec. λ0 is calibrated at step 0 so that L_dec's
     mean gradient per score equals L_inc's (the two are otherwise on unrelated scales: a fixed
     λ = 1 moved no score to zero in 70 steps on SmolLM2); λ(t) = λ0·(1 + ramp)^t. The target is
     the ratio from step 0. Progressive (an option, measured worse: bench/results/quality.md): the
     target ramps, ratio·min(1, (t + 1)/(ramp_frac·s1)), and the keep set and L_dec follow it, so
     components are cut a few at a time while L_inc adapts (serving a prefix of a lower-ratio run
     beat training straight at the higher ratio). Ends when the implied ratio reaches the target
     (or at `stage1_frac` of the steps).
  2. oscillation, to `stage2_frac`: L_dec (λ frozen at its stage-1 end value) switched on while
     the implied ratio is below the target and off above it, so L_inc restores what was
     over-pruned while the ratio hovers at the target.
  3. sparsification, to the end: L_inc + the L_sp proximal step, the keep set recomputed each
     step; survivors are free to grow above 1 and compensate for what is cut.
Measured (SmolLM2-135M, ratio 0.3, 200 steps of 2 × 128 tokens, 32 calibration windows, 7 min
on 2 CPU cores): perplexity 29.6 on a train.txt tail vs 45.3 for SVD-LLM (dense 14.3).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.llama import CausalLM
from engine.model.rank_budget import allocate_ranks, dense_rank, uniform_priority
from kernels import lowrank_gemm

from .data_parallel import (average_across_ranks, full, hidden_states_fn, mean_across_ranks, progress, shard_layers,
                            split_batch)
from .distill import distill_kl, head_weight
from .factorize import Factors

PRIOR = 0.05  # weight of the uniform-rank tie-break in the ranking key
RATIO_SLACK = 0.0025  # stage 1 ends this close to the target (components are discrete)


@dataclass(frozen=True, slots=True)
class SoCoConfig:
    ratio: float  # fraction of the decoder's linear parameters to remove
    steps: int = 600
    batch_size: int = 2  # windows per step
    seq_len: int = 128  # tokens per training window
    lr: float = 3e-2
    ramp: float = 0.05  # stage-1 growth of the L_dec weight per step (multiplicative)
    stage1_frac: float = 0.5
    stage2_frac: float = 0.75
    progressive: bool = False  # stage 1 ramps the target ratio (see the module docstring; measured worse so far)
    fsdp: bool = False  # in a process group: shard the frozen factors and the teacher across the ranks
    ramp_frac: float = 0.5  # the ramped target reaches the ratio at this fraction of stage 1 (then
    # the last scores it reaches still have the ~1/lr Adam steps they need to fall from 1 to 0)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.ratio < 1:
            raise ValueError(f"ratio must be in (0, 1), got {self.ratio}")
        if self.steps < 4:
            raise ValueError(f"steps must be at least 4, got {self.steps}")
        if not 0 < self.ramp_frac <= 1:
            raise ValueError(f"ramp_frac must be in (0, 1], got {self.ramp_frac}")
        if not 0 < self.stage1_frac <= self.stage2_frac < 1:
            raise ValueError(f"need 0 < stage1_frac <= stage2_frac < 1, got {self.stage1_frac}, {self.stage2_frac}")

    def as_dict(self) -> dict:
        return asdict(self)


def straight_through_relu(m: torch.Tensor) -> torch.Tensor:
    """relu(m) forward, identity backward."""
    return m + (m.relu() - m).detach()


class MaskedLowRank(nn.Module):
    """A factorised linear with a learnable score per component (the SoCo student's layer).

    Only the components up to the module's break-even rank are trained: a module that keeps
    more is stored dense anyway, so the student never costs more than the dense model.
    """

    def __init__(self, factors: Factors, bias: torch.Tensor | None):
        super().__init__()
        k = min(len(factors.sigma), int(dense_rank(factors.shape)))
        # Frozen parameters rather than buffers: what FSDP shards (`fsdp`); no gradient is formed for them.
        self.A = nn.Parameter(factors.A[:, :k].float().contiguous(), requires_grad=False)
        self.B = nn.Parameter(factors.B[:k].float().contiguous(), requires_grad=False)
        self.register_buffer("bias", None if bias is None else bias.float())
        self.scores = nn.Parameter(torch.ones(k))
        self.cost = sum(factors.shape)  # parameters per component: out + in
        # Ties among equal scores break towards SVD-LLM's uniform ranks: training starts there.
        self.register_buffer("prior", 1 + PRIOR * uniform_priority(factors.shape, k).float())

    def key(self) -> torch.Tensor:
        """What the global threshold ranks: relu(m) with the uniform prior as a tie-break."""
        return self.scores.detach().relu() * self.prior

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lowrank_gemm(x, self.A, self.B, self.bias, scale=straight_through_relu(self.scores))


@dataclass
class SoCoResult:
    scores: dict[str, torch.Tensor]  # ranking key per component (float32 [k]); 0 where cut
    scales: dict[str, torch.Tensor]  # relu(m): the multipliers bake folds into A
    history: list[dict]  # per logged step: step, stage, kl, ratio, lambda
    seconds: float


def build_student(teacher: CausalLM, factors: dict[str, Factors]) -> CausalLM:
    student = copy.deepcopy(teacher)
    for name, f in factors.items():
        parent, _, child = name.rpartition(".")
        bias = student.get_submodule(name).bias
        setattr(student.get_submodule(parent), child, MaskedLowRank(f, bias))
    return student


def keep_masks(modules: dict[str, MaskedLowRank], budget: int) -> dict[str, torch.Tensor]:
    """The components bake would keep at `budget` (the global rule over the ranking keys)."""
    keys = {name: m.key() for name, m in modules.items()}
    shapes = {name: (m.A.shape[0], m.B.shape[1]) for name, m in modules.items()}
    ranks = allocate_ranks(keys, shapes, budget, dense_fallback=True)
    masks = {}
    for name, key in keys.items():
        keep = torch.zeros_like(key, dtype=torch.bool)
        keep[key.argsort(descending=True, stable=True)[: ranks[name]]] = True
        masks[name] = keep
    return masks


def implied_params(modules: dict[str, MaskedLowRank], keep: dict[str, torch.Tensor]) -> torch.Tensor:
    """Parameters of the components still on (m > 0). Gradient: that of Σ (out+in)·clamp(m, 0, 1)
    over the components outside the keep set only, so the pressure lands on the ones the global
    threshold would cut now, not on every score alike (uniform pressure shrank every σ and
    raised the KL to 1.5 nats before any component reached zero)."""
    soft = sum(m.cost * (m.scores.clamp(0, 1) * ~keep[n]).sum() for n, m in modules.items())
    hard = sum(m.cost * (m.scores > 0).sum() for m in modules.values())
    return soft + (hard - soft).detach()


def train_scores(
    teacher: CausalLM, factors: dict[str, Factors], windows: torch.Tensor, config: SoCoConfig, dense_params: int
) -> SoCoResult:
    """Learn scores for `factors` (name -> whitened SVD of that decoder linear) on `windows` [N, L].

    `dense_params` is the parameter count of all decoder linears (the ratio's denominator).
    Inside a torch.distributed group each rank runs its share of every step's batch and the
    scores' gradients are averaged over the ranks (`converters.data_parallel`): the same steps
    as one process over the whole batch.
    """
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    student = build_student(teacher, factors)
    modules = {name: student.get_submodule(name) for name in factors}
    scores = [m.scores for m in modules.values()]
    if config.fsdp:  # the factors (and the teacher) sharded; the scores, a few thousand values, replicated
        shard_layers(student, ignored=set(scores))
        shard_layers(teacher)
    student_hidden = hidden_states_fn(student, replicate=not config.fsdp)
    target = (1 - config.ratio) * dense_params
    optimizer = torch.optim.Adam(scores, lr=config.lr)
    s1_end, s2_end = int(config.stage1_frac * config.steps), int(config.stage2_frac * config.steps)
    stage, weight, lambda0, history = 1, 0.0, None, []
    mean_cost = sum(m.cost * len(m.scores) for m in modules.values()) / sum(len(m.scores) for m in modules.values())
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(config.seed))
    bar = progress(range(config.steps), desc="soco", unit="step")
    for step in bar:
        idx = order[(torch.arange(config.batch_size) + step * config.batch_size) % len(windows)]
        batch, share = split_batch(windows[idx])
        with torch.no_grad():
            teacher_hidden = torch.cat(teacher.hidden_states(list(batch)))
        kl = share * distill_kl(student_hidden(list(batch)), teacher_hidden, full(head_weight(student)))
        goal = config.ratio
        if stage == 1 and config.progressive:
            goal = config.ratio * min(1.0, (step + 1) / max(1, config.ramp_frac * s1_end))
        goal_params = (1 - goal) * dense_params
        keep = keep_masks(modules, int(goal_params))
        params = implied_params(modules, keep)
        ratio = 1 - params.item() / dense_params
        if stage == 1 and (ratio >= config.ratio - RATIO_SLACK or step >= s1_end):
            stage = 2
        if stage == 2 and step >= s2_end:
            stage = 3
        if stage == 1 and lambda0 is not None:
            weight = lambda0 * (1 + config.ramp) ** step
            lambda_end = weight
        elif stage == 2:
            weight = lambda_end if ratio < config.ratio else 0.0
        else:
            weight = 0.0
        loss = kl + weight * F.relu(params / (target if stage > 1 else goal_params) - 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.fsdp:  # FSDP leaves the replicated scores alone: their gradients averaged here, as DDP would
            average_across_ranks([m.scores.grad for m in modules.values()])
        if lambda0 is None:  # step 0 ran on L_inc alone: match L_dec's gradient scale to it
            kl_grad = torch.cat([m.scores.grad.abs() for m in modules.values()]).mean().item()
            lambda0 = lambda_end = kl_grad / (mean_cost / target)
        optimizer.step()
        if stage == 3:
            _sparsify(modules, keep_masks(modules, int(target)), steps_left=config.steps - step - 1)
        record = {"step": step, "stage": stage, "kl": mean_across_ranks(kl), "ratio": ratio, "goal": goal, "lambda": weight}
        if step % 10 == 0 or step == config.steps - 1:
            history.append(record)
        bar.set_postfix(stage=stage, kl=f"{record['kl']:.4f}", ratio=f"{ratio:.3f}")
    return SoCoResult(
        scores={name: m.key() for name, m in modules.items()},
        scales={name: m.scores.detach().relu() for name, m in modules.items()},
        history=history,
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def _sparsify(modules: dict[str, MaskedLowRank], keep: dict[str, torch.Tensor], steps_left: int) -> None:
    """Proximal L1 step on the components outside the keep set, sized to hit exact zero by the end."""
    for name, m in modules.items():
        cut = m.scores[~keep[name]]
        shrink = cut.abs() / (steps_left + 1)  # = |m| at the last step: exact zero
        m.scores[~keep[name]] = torch.sign(cut) * (cut.abs() - shrink).clamp(min=0)
