"""The compression pipeline: calibrate → factorise → (SoCo) → bake, for one ratio and method.

Methods: `svd` (plain SVD, uniform ratio per module), `svd-llm` (whitened SVD, uniform ratio),
`soco` (whitened SVD + learned scores under one global budget). The ratio is defined once: the
fraction of the decoder's linear-layer parameters removed (`engine.model.rank_budget`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine import load_model
from engine.model.checkpoint import read_manifest
from engine.model.llama import CausalLM
from engine.model.loader import load_tokenizer
from engine.model.rank_budget import uniform_priority

from .bake import bake
from .calibrate import SHARED_INPUT, collect_grams, decoder_linears, gram_key, sample_windows, tokenize_file
from .data_parallel import check_batch_size, progress
from .factorize import Factors, whitened_svd
from .quantize import refuse_quantized
from .soco import PRIOR, RATIO_SLACK, SoCoConfig, train_scores

METHODS = ("svd", "svd-llm", "soco")


@dataclass(frozen=True, slots=True)
class CompressConfig:
    ratio: float
    method: str = "soco"
    calib: str = ""  # calibration text file
    samples: int = 128  # calibration windows for the Grams
    seq_len: int = 512
    steps: int = 600  # SoCo training steps
    train_seq_len: int = 128
    batch_size: int = 2
    lr: float = 2e-2
    progressive: bool = False  # SoCo's stage 1 ramps its target ratio (converters.soco; worse so far)
    fsdp: bool = False  # SoCo in a process group: factors and teacher sharded across the ranks
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.ratio < 1:
            raise ValueError(f"ratio must be in (0, 1), got {self.ratio}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("samples", "seq_len", "steps", "train_seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass
class Prepared:
    """A loaded model with every decoder linear factorised: what all methods and ratios start from."""

    model: CausalLM
    factors: dict[str, Factors]
    token_ids: list[int] | None  # the calibration text, tokenized (SoCo trains on it too)
    calibration: dict | None
    seconds: float


def prepare(model_dir: str | Path, config: CompressConfig, whiten: bool) -> Prepared:
    """Load, calibrate (when whitening) and factorise every decoder linear."""
    start = time.perf_counter()
    refuse_quantized(Path(model_dir), read_manifest(model_dir), "compress")
    model = load_model(model_dir, dtype=torch.float32, device=config.device)
    tokenizer = load_tokenizer(model_dir)
    token_ids = tokenize_file(tokenizer, config.calib) if whiten or config.method == "soco" else None
    grams, calibration = {}, None
    if whiten:
        windows = sample_windows(token_ids, config.samples, config.seq_len, config.seed)
        grams = collect_grams(model, windows)
        calibration = {"file": config.calib, "samples": config.samples, "seq_len": config.seq_len,
                       "tokens": config.samples * config.seq_len, "seed": config.seed}
    factors: dict[str, Factors] = {}
    for name in progress(decoder_linears(model), desc="factorize", unit="linear"):
        factors[name] = whitened_svd(model.get_submodule(name).weight, grams.get(gram_key(name)))
    return Prepared(model, factors, token_ids, calibration, time.perf_counter() - start)


def compress_prepared(prepared: Prepared, model_dir: str | Path, out: str | Path, config: CompressConfig) -> dict:
    """Score the components (SoCo, or uniform ranks for the SVD methods) and bake `out`."""
    start = time.perf_counter()
    factors = prepared.factors
    manifest: dict = {"method": config.method, "settings": asdict(config), "calibration": prepared.calibration}
    scales = None
    if config.method == "soco":
        soco = SoCoConfig(ratio=config.ratio, steps=config.steps, batch_size=config.batch_size,
                          seq_len=config.train_seq_len, lr=config.lr, progressive=config.progressive,
                          fsdp=config.fsdp, seed=config.seed)
        count = min(config.steps * config.batch_size, len(prepared.token_ids) // config.train_seq_len)
        train_windows = sample_windows(prepared.token_ids, count, config.train_seq_len, config.seed + 1)
        dense_total = sum(o * i for o, i in (f.shape for f in factors.values()))
        result = train_scores(prepared.model, factors, train_windows, soco, dense_total)
        scores, scales = result.scores, result.scales
        manifest["soco"] = {"config": soco.as_dict(), "prior": PRIOR, "ratio_slack": RATIO_SLACK,
                            "train_windows": count, "seconds": round(result.seconds, 1),
                            "history": result.history}
    else:
        scores = {name: uniform_priority(f.shape, len(f.sigma)) for name, f in factors.items()}
    manifest["seconds"] = round(prepared.seconds + time.perf_counter() - start, 1)
    return bake(Path(model_dir), Path(out), factors, scores, config.ratio, manifest, scales)


def compress(model_dir: str | Path, out: str | Path, config: CompressConfig) -> dict:
    """Compress `model_dir` into the folder `out`; returns the written manifest."""
    if config.method == "soco":
        check_batch_size(config.batch_size, "--batch-size")  # before the calibration, not after it
    prepared = prepare(model_dir, config, whiten=config.method != "svd")
    return compress_prepared(prepared, model_dir, out, config)


def rank_table(manifest: dict) -> str:
    """Per-layer kept rank of each projection ('dense' where factors would not save)."""
    leaves = list(SHARED_INPUT)
    rows = {}
    for name, m in manifest["modules"].items():
        layer = int(name.split(".")[2])
        rows.setdefault(layer, {})[name.rpartition(".")[2]] = str(m["rank"]) if m["factorized"] else "dense"
    lines = ["layer " + " ".join(f"{leaf:>9}" for leaf in leaves)]
    lines += [f"{layer:>5} " + " ".join(f"{row[leaf]:>9}" for leaf in leaves) for layer, row in sorted(rows.items())]
    return "\n".join(lines)
