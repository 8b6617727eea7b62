"""Healing: train a compressed folder's kept factors by distillation from its dense teacher.

SoCo (and SVD-LLM's uniform ranks) only choose which components stay; the kept ones cannot move
to absorb what was cut. Healing trains the factors A, B of every factorised linear and the
RMSNorm weights (optionally also the linears left dense) so that the student's next-token
distributions approach the dense teacher's on windows of the calibration text. The loss is never
a language-model loss on the text: the student must approach the teacher, not fit the corpus.

Nested (any size from one run). With `max_ratio`, each step samples a ratio uniformly in
[baked ratio, max_ratio], takes the rank prefix the global rule gives there over the folder's
stored scores (`engine.model.loader.prefix_ranks`, what the loader serves) and distils that prefix.
Components shared by many sizes learn from all of them, so `LLM(path, ratio=r)` serves any r in
the range. The scores are not trained: every ratio keeps exactly the ranks it had before.

Parametrisation. Bake balances the factors (√σ on each side), so their entries' scales differ by
orders of magnitude across modules and components (whitened σ reach 1e5 where activations are
large). Each component is trained in unit form, A = Â·diag(a), B = diag(b)·B̂ with a, b the RMS of
A's columns and B's rows at the start (fixed, the kernel's `scale` argument carries a·b), so one
Adam step moves every component by the same relative amount (a plain probe with one absolute
learning rate on the balanced factors gained little at 1e-5 and diverged at 2e-4).

Modes. `full`: Â and B̂ are trained. `lora`: Â + P_a·Q_a and B̂ + P_b·Q_b with rank-`lora_rank`
corrections (P zero at the start, Q Gaussian / √lora_rank), merged into A and B when written, so
the folder keeps its shapes, its rank prefixes and its kernels.

Loss. KL(teacher ‖ student) of next-token distributions, mean over tokens
(`converters.distill.distill_kl`, fused with the head); optionally plus `hidden_weight` times
the mean over layers of ‖h_s − h_t‖² / ‖h_t‖² of each decoder layer's output.

Optimiser. Adam (β = `betas`, ε = 1e-8, no weight decay), learning rate `lr` (relative, see above;
dense linears and norms get `lr` × the RMS of their weight) with a linear warm-up over
`warmup_frac` of the steps and a cosine decay to `min_lr_frac`·lr; gradients clipped to global
norm `clip`. Embeddings, the head and LoRC K/V latents stay frozen.

Resume. Every `checkpoint_every` steps (and when stopped) the trainable tensors, Adam's moments
and the step are written (one safetensors file) into `<out>.partial/`; windows and ratios are pure
functions of (seed, step), so a resumed run ends in the same weights as an uninterrupted one.
The healed folder itself is written atomically at the end and the partial folder removed.

Memory. Student and teacher are float32. Full mode adds a gradient and two Adam moments per
trained value (16 bytes per kept factor entry in all): on a 7B model at ratio 0.3 that is ~72 GB
for the factors alone, beyond one 80 GB GPU beside the teacher; LoRA mode trains a few per cent
of that and fits there, and `fsdp` (N ranks of a process group) shards student and teacher so
each rank holds 1/N of them (`converters.data_parallel.shard_layers`). Measured runs (time per phase, page faults, peak RSS) are recorded per
folder.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from engine import load_model
from engine.core.cpu_memory import keep_freed_memory
from engine.model.checkpoint import open_weights, read_manifest, weight_files
from engine.model.config import ModelFolderError
from engine.model.layers import Linear, LowRankLinear, RMSNorm
from engine.model.llama import CausalLM
from engine.model.loader import load_tokenizer, prefix_ranks, stored_scores
from kernels import lowrank_gemm

from .bake import files_sha256, read_tensors, weights_sha256, write_folder_atomically
from .calibrate import sample_windows, tokenize_file
from .data_parallel import (agree, check_batch_size, full, hidden_states_fn, like, mean_across_ranks, progress,
                            rank_zero_writes, shard_layers, split_batch, sum_across_ranks, world)
from .distill import distill_kl, head_weight
from .quantize import quantized_problem

HEAL_MODES = ("full", "lora")
CHECKPOINT = "checkpoint.safetensors"


@dataclass(frozen=True, slots=True)
class HealConfig:
    steps: int
    mode: str = "full"
    lr: float | None = None  # relative step; None: 1e-3 (full) or 3e-3 (lora), from bench/results/heal-recipe.md
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0
    batch_size: int = 4  # windows per step
    seq_len: int = 256  # tokens per window
    max_ratio: float | None = None  # nested training over [baked ratio, max_ratio]
    train_dense: bool = False  # also the linears left dense
    train_norms: bool = True  # a consistent small gain for 35k parameters (bench/results/heal-recipe.md)
    lora_rank: int = 16
    hidden_weight: float = 0.0
    fsdp: bool = False  # in a process group: shard student and teacher across the ranks instead of replicating them
    checkpoint_every: int = 25
    calib: str = ""
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in HEAL_MODES:
            raise ValueError(f"heal mode must be one of {', '.join(HEAL_MODES)}, got {self.mode!r}")
        if self.lr is None:
            object.__setattr__(self, "lr", 1e-3 if self.mode == "full" else 3e-3)
        for name in ("steps", "batch_size", "seq_len", "lora_rank", "checkpoint_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"heal {name} must be a positive integer, got {getattr(self, name)!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"heal lr must be positive, got {self.lr}")
        if self.max_ratio is not None and not 0 < self.max_ratio < 1:
            raise ValueError(f"max ratio must be in (0, 1), got {self.max_ratio}")
        if not 0 <= self.warmup_frac < 1 or not 0 <= self.min_lr_frac <= 1:
            raise ValueError(f"need 0 <= warmup_frac < 1 and 0 <= min_lr_frac <= 1, got {self.warmup_frac}, "
                             f"{self.min_lr_frac}")
        if not (0 <= self.hidden_weight and math.isfinite(self.hidden_weight)):
            raise ValueError(f"hidden weight must be a finite number >= 0, got {self.hidden_weight}")

    def as_dict(self) -> dict:
        return asdict(self) | {"betas": list(self.betas)}

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to min_lr_frac·lr at the last step."""
        warmup = int(self.warmup_frac * self.steps)
        if step < warmup:
            return self.lr * (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, self.steps - 1 - warmup)
        return self.lr * (self.min_lr_frac + (1 - self.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


class HealedLowRank(nn.Module):
    """A factorised linear in unit form for training: y = ((x·B̂ᵀ) ⊙ a·b)·Âᵀ + bias (see the module doc)."""

    def __init__(self, module: LowRankLinear, mode: str, lora_rank: int, generator: torch.Generator):
        super().__init__()
        A, B = module.A.detach().float(), module.B.detach().float()
        a = A.pow(2).mean(0).sqrt().clamp(min=1e-12)
        b = B.pow(2).mean(1).sqrt().clamp(min=1e-12)
        self.register_buffer("a", a)
        self.register_buffer("b", b)
        self.register_buffer("gain", a * b)
        self.bias = None if module.bias is None else module.bias.detach().float()
        self.rank: int | None = None  # the prefix trained this step (None: all stored components)
        self.lora = mode == "lora"
        train = not self.lora
        self.A_unit = nn.Parameter((A / a).contiguous(), requires_grad=train)
        self.B_unit = nn.Parameter((B / b[:, None]).contiguous(), requires_grad=train)
        if self.lora:
            (out_f, r), in_f, k = A.shape, B.shape[1], min(lora_rank, *A.shape, *B.shape)
            self.P_a = nn.Parameter(torch.zeros(out_f, k))
            self.Q_a = nn.Parameter(torch.randn(k, r, generator=generator) / k**0.5)
            self.P_b = nn.Parameter(torch.zeros(r, k))
            self.Q_b = nn.Parameter(torch.randn(k, in_f, generator=generator) / k**0.5)

    def unit_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.lora:
            return self.A_unit, self.B_unit
        return self.A_unit + self.P_a @ self.Q_a, self.B_unit + self.P_b @ self.Q_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B = self.unit_factors()
        return lowrank_gemm(x, A, B, self.bias, scale=self.gain, rank=self.rank)

    @torch.no_grad()
    def merged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as the folder stores them: the unit form scaled back (LoRA merged in). Sharded
        (fsdp), every rank calls it: the shards are gathered."""
        A, B = full(self.A_unit), full(self.B_unit)
        if self.lora:
            A, B = A + full(self.P_a) @ full(self.Q_a), B + full(self.P_b) @ full(self.Q_b)
        return A * self.a, B * self.b[:, None]


def unhealable(folder: Path, manifest: dict | None) -> str | None:
    """Why `folder` cannot be healed (None when it can): it needs factorised weights, not only K/V latents."""
    modules = (manifest or {}).get("modules", {})
    if problem := quantized_problem(folder, manifest, "heal"):
        return problem
    if not any(m.get("factorized") for m in modules.values()):
        return f"{folder} is not a compressed folder (no lowrank.json with factorised modules): run `lowrank compress`"
    if all(m.get("latent") for m in modules.values() if m.get("factorized")):
        return (f"{folder} has only its K/V cache factorised (LoRC latents, which healing keeps frozen): "
                "compress its weights with --ratio to heal them")
    return None


@dataclass
class Student:
    model: CausalLM
    factorised: dict[str, HealedLowRank]
    trained: dict[str, nn.Parameter]  # every trainable tensor, by a stable name
    groups: list[dict]  # Adam's parameter groups, with each one's learning-rate multiplier


def build_student(folder: Path, manifest: dict, config: HealConfig) -> Student:
    """The folder at its full stored rank in float32, factorised linears swapped for `HealedLowRank`."""
    model = load_model(folder, dtype=torch.float32, device=config.device)
    generator = torch.Generator().manual_seed(config.seed)
    latent = {name for name, m in manifest["modules"].items() if m.get("latent")}
    factorised = {}
    for name, m in manifest["modules"].items():
        if m["factorized"] and name not in latent:
            parent, _, child = name.rpartition(".")
            healed = HealedLowRank(model.get_submodule(name), config.mode, config.lora_rank, generator)
            setattr(model.get_submodule(parent), child, healed.to(config.device))
            factorised[name] = healed
    names = [f"{name}.{leaf}" for name, module in factorised.items()
             for leaf, p in module.named_parameters() if p.requires_grad]
    scales = {}  # one group each beyond the factors: lr × that weight's RMS
    for name, module in model.named_modules():
        if (config.train_dense and isinstance(module, Linear) and name in manifest["modules"]) or \
                (config.train_norms and isinstance(module, RMSNorm)):
            module.weight.requires_grad_(True)
            scales[f"{name}.weight"] = module.weight.detach().pow(2).mean().sqrt().clamp(min=1e-12).item()
    if config.fsdp:
        shard_layers(model)  # the parameters become shards (DTensors): collected by name below
    params = dict(model.named_parameters())
    trained = {name: params[name] for name in names + list(scales)}
    groups = [{"params": [trained[n] for n in names], "scale": 1.0}]
    groups += [{"params": [trained[n]], "scale": scale} for n, scale in scales.items()]
    return Student(model, factorised, trained, groups)


def heal(folder: str | Path, out: str | Path, config: HealConfig, teacher: str | Path | None = None,
         resume: bool = False, partial: Path | None = None, stop_after: int | None = None,
         snapshot: Path | None = None) -> dict | None:
    """Heal the compressed `folder` into `out`; returns its manifest (None when stopped early).

    teacher: the dense folder it was compressed from (default: the one its manifest names, whose
    weights must hash as recorded). resume: continue from the checkpoint in `partial` (default
    `<out>.partial`). stop_after: checkpoint and return after this many steps (a run split over
    several sessions); the next call with `resume` goes on from there; `snapshot`, if given, then
    receives the weights as they are at that step, as a folder.
    """
    folder, out = Path(folder), Path(out)
    partial = Path(partial) if partial is not None else out.with_name(f"{out.name}.partial")
    run = _Run(folder, config, teacher)
    if agree(resume and (partial / CHECKPOINT).is_file()):
        run.start, run.history = _load_checkpoint(partial, run.fingerprint, run.student, run.optimizer)
    else:  # a fresh start: an older checkpoint goes (not the folder, where a caller may keep more)
        if resume and world()[0] == 0:
            print(f"heal: no checkpoint in {partial}: starting from step 0", file=sys.stderr)
        rank_zero_writes(lambda: (partial / CHECKPOINT).unlink(missing_ok=True))
    end = config.steps if stop_after is None else min(config.steps, run.start + stop_after)
    bar = progress(range(run.start, end), desc="heal", unit="step", initial=run.start, total=config.steps)
    for step in bar:
        run.step(step)
        bar.set_postfix(kl=f"{run.history[-1]['kl']:.4f}", ratio=f"{run.history[-1]['ratio']:.3f}",
                        tok_s=f"{run.tokens_per_second():.0f}")
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < end:
            _save_checkpoint(partial, run.fingerprint, step + 1, run.history, run.student, run.optimizer)
    manifest = run.manifest | {"healing": run.record(end)}
    if end < config.steps:
        _save_checkpoint(partial, run.fingerprint, end, run.history, run.student, run.optimizer)
        if snapshot is not None:  # the weights as they are mid-schedule, e.g. for a perplexity-vs-steps curve
            write_healed(folder, Path(snapshot), run.student, manifest)
        return None
    write_healed(folder, out, run.student, manifest)
    rank_zero_writes(lambda: shutil.rmtree(partial, ignore_errors=True))
    return manifest


class _Run:
    """Everything one healing run holds: student, teacher, windows, optimiser, history and timings."""

    def __init__(self, folder: Path, config: HealConfig, teacher: str | Path | None):
        manifest = read_manifest(folder)
        if problem := unhealable(folder, manifest):
            raise ModelFolderError(problem)
        self.baked = manifest["achieved_ratio"]
        if config.max_ratio is not None and config.max_ratio < self.baked:
            raise ValueError(f"max ratio {config.max_ratio} is below the folder's ratio {self.baked:.4f}")
        self.folder, self.config, self.manifest = folder, config, manifest
        self.teacher_dir, self.teacher_sha256 = _teacher(manifest, teacher)
        if torch.device(config.device).type == "cpu":
            keep_freed_memory()  # activations from reused heap memory, not fresh pages (engine.core.cpu_memory)
        torch.manual_seed(config.seed)
        check_batch_size(config.batch_size, "--heal-batch-size")
        self.student = build_student(folder, manifest, config)
        # In a group: replicated under DistributedDataParallel, or (fsdp) sharded, each rank holding a share.
        self.student_hidden = hidden_states_fn(self.student.model, replicate=not config.fsdp)
        self.scores = stored_scores(weight_files(folder))
        self.teacher = load_model(self.teacher_dir, dtype=torch.float32, device=config.device)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        if config.fsdp:
            shard_layers(self.teacher)
        token_ids = tokenize_file(load_tokenizer(folder), config.calib)
        self.count = min(config.steps * config.batch_size, len(token_ids) // config.seq_len)
        if self.count < 1:
            raise ValueError(f"the calibration text {config.calib} has {len(token_ids)} tokens, fewer than one "
                             f"window of {config.seq_len}")
        self.windows = sample_windows(token_ids, self.count, config.seq_len, config.seed + 2)
        self.order = torch.randperm(self.count, generator=torch.Generator().manual_seed(config.seed + 3))
        self.optimizer = torch.optim.Adam(
            [{"params": g["params"], "lr": config.lr * g["scale"]} for g in self.student.groups],
            betas=config.betas, eps=1e-8)
        # What the weights depend on (not checkpoint_every): a checkpoint resumes only the same run.
        self.fingerprint = {"config": {k: v for k, v in config.as_dict().items() if k not in ("checkpoint_every", "fsdp")},
                            "folder_sha256": weights_sha256(folder), "calib_sha256": files_sha256([Path(config.calib)])}
        self.start, self.history = 0, []
        self.timing = {"teacher": 0.0, "student": 0.0, "backward": 0.0, "optimizer": 0.0}
        _reset_peak_rss()
        self.faults0, self.started, self.tokens = _minor_faults(), time.perf_counter(), 0

    def step(self, step: int) -> None:
        config, student = self.config, self.student
        ratio = _ratio_at(config, self.baked, step)
        ranks = prefix_ranks(self.manifest, self.scores, ratio) if config.max_ratio is not None else {}
        for name, module in student.factorised.items():
            module.rank = ranks.get(name)
        batch, share = split_batch(
            self.windows[self.order[(torch.arange(config.batch_size) + step * config.batch_size) % self.count]])
        loss, kl, parts = _loss(student.model, self.student_hidden, self.teacher, list(batch), share,
                                config.hidden_weight)
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(list(student.trained.values()), config.clip)
        for group, spec in zip(self.optimizer.param_groups, student.groups):
            group["lr"] = config.lr_at(step) * spec["scale"]
        self.optimizer.step()
        t2 = time.perf_counter()
        for phase, seconds in (*parts.items(), ("backward", t1 - t0), ("optimizer", t2 - t1)):
            self.timing[phase] += seconds
        self.tokens += config.batch_size * config.seq_len
        self.history.append({"step": step, "kl": round(kl, 5), "ratio": round(ratio, 4), "lr": config.lr_at(step),
                             "seconds": round(sum(parts.values()) + t2 - t0, 3)})

    def tokens_per_second(self) -> float:
        return self.tokens / (time.perf_counter() - self.started)

    def record(self, end: int) -> dict:
        """What lowrank.json keeps of the run: settings, teacher, timings, memory, the KL's course."""
        config, history = self.config, self.history
        seconds = time.perf_counter() - self.started
        tail = max(1, len(history) // 10)
        return {
            "config": config.as_dict(),
            "teacher": {"path": str(self.teacher_dir), "weights_sha256": self.teacher_sha256},
            "ratios": [self.baked, config.max_ratio if config.max_ratio is not None else self.baked],
            "calibration": {"file": config.calib, "windows": self.count,
                            "tokens_per_step": config.batch_size * config.seq_len},
            "trainable_params": sum(p.numel() for p in self.student.trained.values()),
            "steps_done": end, "resumed_at": self.start or None,
            "seconds": round(sum(h["seconds"] for h in history), 1),  # training steps only, over every resumed part
            "step_seconds": {k: round(v / max(1, end - self.start), 3) for k, v in self.timing.items()},
            "minor_faults_per_second": round((_minor_faults() - self.faults0) / seconds),
            "peak_rss_mib": _peak_rss_mib(),  # since the run started, where Linux can reset the peak
            "first_kl": round(sum(h["kl"] for h in history[:tail]) / tail, 5),  # mean over the first tenth of the steps
            "final_kl": round(sum(h["kl"] for h in history[-tail:]) / tail, 5),  # ... and over the last tenth
            "history": history[::10] + ([history[-1]] if (len(history) - 1) % 10 else []),
        }


def _loss(student: CausalLM, student_hidden, teacher: CausalLM, batch: list[torch.Tensor], share: float,
          hidden_weight: float):
    """(loss, the whole batch's KL as a float, seconds of the teacher's and the student's forward passes).

    `batch` is this rank's share of the step's windows, `share` its weight (`split_batch`): the
    ranks' losses average to the whole batch's. The hidden-state term's denominators ‖h_t‖² are
    summed over the ranks first, so it too is the whole batch's, not a mean of per-rank ratios."""
    t0 = time.perf_counter()
    with torch.no_grad(), _layer_outputs(teacher, hidden_weight > 0) as teacher_layers:
        teacher_hidden = torch.cat(teacher.hidden_states(batch))
    t1 = time.perf_counter()
    with _layer_outputs(student, hidden_weight > 0) as student_layers:
        hidden = student_hidden(batch)
    kl = share * distill_kl(hidden, teacher_hidden, full(head_weight(student)))  # whole, when sharded
    loss = kl
    if hidden_weight > 0:
        norms = torch.stack([t.pow(2).sum() for t in teacher_layers])
        norms = sum_across_ranks({"norms": norms})["norms"]
        terms = torch.stack([(s - t).pow(2).sum() for s, t in zip(student_layers, teacher_layers)]) / norms
        loss = kl + hidden_weight * world()[1] * terms.mean()
    return loss, mean_across_ranks(kl), {"teacher": t1 - t0, "student": time.perf_counter() - t1}


class _layer_outputs:
    """Collect each decoder layer's output during a forward pass (when `on`)."""

    def __init__(self, model: CausalLM, on: bool):
        self.model, self.on, self.outputs, self.handles = model, on, [], []

    def __enter__(self) -> list[torch.Tensor]:
        if self.on:
            for layer in self.model.model.layers:
                self.handles.append(layer.register_forward_hook(lambda m, i, o: self.outputs.append(o)))
        return self.outputs

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def _ratio_at(config: HealConfig, baked: float, step: int) -> float:
    """The ratio trained at `step`: the folder's own, or a draw in [baked, max_ratio] fixed by (seed, step)."""
    if config.max_ratio is None:
        return baked
    u = torch.rand((), generator=torch.Generator().manual_seed(config.seed * 1_000_003 + step)).item()
    return baked + (config.max_ratio - baked) * u


def _teacher(manifest: dict, teacher: str | Path | None) -> tuple[Path, str]:
    """The dense teacher's folder and its weights' sha256, checked against what lowrank.json records."""
    source = manifest.get("source") or {}
    path = Path(teacher) if teacher is not None else Path(source.get("path", ""))
    if not (path / "config.json").is_file():
        raise ModelFolderError(f"the dense teacher {str(path) or '(none recorded)'} is not a model folder: "
                               "pass the folder this model was compressed from as the teacher")
    sha256 = weights_sha256(path)
    if "weights_sha256" in source and sha256 != source["weights_sha256"]:
        raise ModelFolderError(f"the teacher {path} is not the model this folder was compressed from "
                               "(its weights' sha256 differs from the one lowrank.json records)")
    return path, sha256


def _reset_peak_rss() -> None:
    """Linux: restart the process's peak-RSS counter (VmHWM), so a run reports its own peak, not that
    of the compression that ran before it in the same process."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mib() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # the process's whole life


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def write_healed(folder: Path, out: Path, student: Student, manifest: dict) -> None:
    """The input folder with its trained tensors replaced (in the folder's own dtype), atomically."""
    tensors = read_tensors(folder)
    updates = {}
    for name, module in student.factorised.items():
        updates[f"{name}.A"], updates[f"{name}.B"] = module.merged()
    for name, p in student.trained.items():
        if name.endswith(".weight"):
            updates[name] = full(p.detach())
    for name, value in updates.items():
        tensors[name] = value.to("cpu", tensors[name].dtype).contiguous()
    write_folder_atomically(folder, out, tensors, manifest)


def _save_checkpoint(partial: Path, fingerprint: dict, step: int, history: list, student: Student,
                     optimizer: torch.optim.Optimizer) -> None:
    """Trainable tensors, Adam's state and the progress at `step` in one safetensors file (the
    progress as its JSON metadata), renamed into place: a crash mid-write keeps the previous one.
    Whole tensors (shards gathered on every rank, fsdp), so any layout resumes it; rank 0 writes."""
    tensors = {f"param.{name}": full(p.detach()).cpu().contiguous() for name, p in student.trained.items()}
    for name, p in student.trained.items():
        if state := optimizer.state.get(p):
            tensors[f"adam.{name}.exp_avg"] = full(state["exp_avg"]).cpu().contiguous()
            tensors[f"adam.{name}.exp_avg_sq"] = full(state["exp_avg_sq"]).cpu().contiguous()
            tensors[f"adam.{name}.step"] = torch.as_tensor(full(state["step"]), dtype=torch.float32).cpu().reshape(1)
    progress = json.dumps(fingerprint | {"step": step, "history": history})
    rank_zero_writes(lambda: _write_checkpoint(partial, tensors, progress))


def _write_checkpoint(partial: Path, tensors: dict[str, torch.Tensor], progress: str) -> None:
    partial.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(partial / f"{CHECKPOINT}.new"), metadata={"progress": progress})
    (partial / f"{CHECKPOINT}.new").replace(partial / CHECKPOINT)


def _load_checkpoint(partial: Path, fingerprint: dict, student: Student,
                     optimizer: torch.optim.Optimizer) -> tuple[int, list]:
    with open_weights(partial / CHECKPOINT) as f:
        progress = json.loads(f.metadata()["progress"])
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    mismatched = [k for k in fingerprint if progress.get(k) != fingerprint[k]]
    if mismatched:
        raise ValueError(f"the checkpoint in {partial} was written for another folder or other settings "
                         f"({', '.join(mismatched)} differ): drop --resume to start over")
    with torch.no_grad():
        for name, p in student.trained.items():
            p.copy_(like(p, tensors[f"param.{name}"]))
            if f"adam.{name}.exp_avg" in tensors:
                optimizer.state[p] = {"step": tensors[f"adam.{name}.step"].reshape(()).clone(),
                                      "exp_avg": like(p, tensors[f"adam.{name}.exp_avg"]),
                                      "exp_avg_sq": like(p, tensors[f"adam.{name}.exp_avg_sq"])}
    return progress["step"], progress["history"]
