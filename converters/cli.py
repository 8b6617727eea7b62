"""The `lowrank` command: pull, compress, heal, quantize, eval, generate, serve.

It lives in `converters` because that is the one package allowed to import both sides
(`converters` may import `engine`, never the reverse). Errors a user can fix print one line
and exit 2; nothing reaches the terminal as a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from engine.config import KV_DTYPES

from .atomic import atomic_write_text
from .data_parallel import agree, rank_zero_writes, shared_temporary_folder
from .cli_types import Parser, float_in, port_number, positive_float, positive_int, ratio_value, seconds
from .pull import REGISTRY, PullError, pull

DEFAULT_TEXT = Path("shared/corpus/pydocs/valid.txt")  # beside the repository, as ../shared
DEFAULT_CALIB = Path("shared/corpus/pydocs/train.txt")


class UsageError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


def models_dir() -> Path:
    return Path(os.environ.get("LOWRANK_MODELS_DIR", "models"))


def resolve_model(arg: str) -> Path:
    """A folder path, or a registered name already pulled into the models folder."""
    path = Path(arg)
    if path.exists() or arg not in REGISTRY:
        return path
    pulled = models_dir() / arg
    if not pulled.exists():
        raise UsageError(f"model {arg!r} is not pulled yet: run `lowrank pull {arg}` first")
    return pulled


def default_text(relative: Path = DEFAULT_TEXT, option: str = "--text") -> Path:
    repo_root = Path(__file__).resolve().parents[1]
    for candidate in (Path.cwd().parent / relative, repo_root.parent / relative):
        if candidate.is_file():
            return candidate
    raise UsageError(f"no {option} given and the default ../{relative} is not present")


def cmd_pull(args: argparse.Namespace) -> None:
    if args.name not in REGISTRY:
        raise UsageError(f"unknown model {args.name!r}; known names: {', '.join(sorted(REGISTRY))}")
    pull(args.name, args.models_dir or models_dir())


def writable_file(path: Path, option: str) -> Path:
    """`path`, checked before the work whose result it will hold: its folder exists and is writable."""
    folder = path.parent
    if not folder.is_dir():
        raise UsageError(f"{option} {path}: the folder {folder} does not exist")
    if path.is_dir() or not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"{option} {path}: cannot write there")
    return path


def cmd_eval(args: argparse.Namespace) -> None:
    from engine import load_model
    from engine.eval.perplexity import load_text, perplexity
    from engine.model.loader import load_tokenizer

    path = resolve_model(args.model)
    json_path = writable_file(Path(args.json), "--json") if args.json else None
    text_path = Path(args.text) if args.text else default_text()
    text = load_text(text_path, args.max_chars)
    model = load_model(path, dtype=args.dtype, device=args.device, ratio=args.ratio)
    model.use_kv_cache_dtype(args.kv_cache_dtype)  # attends to the K/V as stored, as the engine serves them
    if args.int8_activations and model.device.type == "cpu":
        from engine.model.cpu_serving import to_cpu_serving

        to_cpu_serving(model, int8_activations=True)  # the serving kernels, as the engine runs them
    tokenizer = load_tokenizer(path)
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    result = perplexity(model, ids, ctx=args.ctx, stride=args.ctx if args.stride is None else args.stride, batch_size=args.batch_size)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    print(
        f"perplexity {result.perplexity:.4f} (mean NLL {result.mean_nll:.4f} nats) on {text_path}: "
        f"{result.scored_tokens} of {result.total_tokens} tokens scored in {result.windows} windows, "
        f"ctx {result.ctx}, stride {result.stride}, {dtype} on {model.device}, KV {args.kv_cache_dtype}"
        f"{', int8 activations' if args.int8_activations else ''}, "
        f"{result.seconds:.1f} s"
    )
    if json_path:
        record = {"model": str(path), "text": str(text_path), "max_chars": args.max_chars, "dtype": dtype,
                  "kv_cache_dtype": args.kv_cache_dtype, "int8_activations": args.int8_activations}
        atomic_write_text(json_path, json.dumps(record | result.as_dict(), indent=2) + "\n")


def cmd_compress(args: argparse.Namespace) -> None:
    from engine import ModelConfig

    from .compress import CompressConfig, compress, rank_table
    from .lorc import LoRCConfig, lorc

    path = resolve_model(args.model)
    ModelConfig.from_folder(path)  # a missing or unsupported model fails before any work
    if args.ratio is None and args.kv_ratio is None:
        raise UsageError("nothing to do: give --ratio (weights), --kv-ratio (KV cache) or both")
    if args.heal_steps is None and (given := _heal_options_given(args)):
        raise UsageError(f"{', '.join(given)} belong{'s' if len(given) == 1 else ''} to healing: give --heal-steps too")
    if args.heal_steps is not None and args.ratio is None:
        raise UsageError("--heal-steps heals compressed weights: give --ratio too")
    out = _output_folder(args)
    calib = Path(args.calib) if args.calib else default_text(DEFAULT_CALIB, "--calib")
    device = args.device or "cpu"
    config = None if args.ratio is None else CompressConfig(
        ratio=args.ratio, method=args.method, calib=str(calib), samples=args.samples, seq_len=args.seq_len,
        steps=args.steps, batch_size=args.batch_size, fsdp=args.fsdp, device=device, seed=args.seed,
    )
    kv_config = None if args.kv_ratio is None else LoRCConfig(
        kv_ratio=args.kv_ratio, schedule=args.kv_schedule, calib=str(calib), samples=args.samples,
        seq_len=args.seq_len, device=device, seed=args.seed,
    )
    heal_config = None if args.heal_steps is None else _heal_config(args, args.heal_steps, calib, device)
    if heal_config is not None and heal_config.max_ratio is not None and heal_config.max_ratio < args.ratio:
        raise UsageError(f"--max-ratio {heal_config.max_ratio} is below --ratio {args.ratio}")
    given = [flag for flag, value in (("--group", args.group), ("--rounding", args.rounding),
                                      ("--keep-head", args.keep_head or None)) if value is not None]
    if given and args.bits is None:
        raise UsageError(f"{given[0]} belongs to quantisation: give --bits too")
    quant_config = None if args.bits is None else _quant_config(path, args)

    def finish(produce) -> dict | None:
        """`produce(dest)` writes the float folder; with --bits it goes to a temporary folder that is
        quantised into `out`, so `out` appears only once complete."""
        if quant_config is None:
            return produce(out)
        from .quantize import quantize_folder

        out.parent.mkdir(parents=True, exist_ok=True)
        with shared_temporary_folder(out.parent, prefix=f".{out.name}.float-") as tmp:
            if produce(Path(tmp) / "float") is None:
                return None
            return quantize_folder(Path(tmp) / "float", out, quant_config)

    def write(dest: Path) -> dict:
        if kv_config is None:
            return compress(path, dest, config)
        if config is None:
            return lorc(path, dest, kv_config)
        # weights first, then the latent K/V of the compressed model, into `dest` atomically
        dest.parent.mkdir(parents=True, exist_ok=True)
        with shared_temporary_folder(dest.parent, prefix=f".{dest.name}.weights-") as tmp:
            compress(path, Path(tmp) / "weights", config)
            return lorc(Path(tmp) / "weights", dest, kv_config)

    if heal_config is None:
        manifest = finish(write)
    else:  # compressed into <out>.partial/compressed, then healed into out: a resumed run skips the first part
        from dataclasses import asdict

        from .heal import heal

        partial = out.with_name(f"{out.name}.partial")
        compressed, record = partial / "compressed", partial / "compress.json"
        settings = {"model": str(path), "compress": asdict(config), "kv": None if kv_config is None else asdict(kv_config)}
        if not agree(args.resume and record.is_file() and json.loads(record.read_text()) == settings):
            rank_zero_writes(lambda: shutil.rmtree(partial, ignore_errors=True))
            write(compressed)
            rank_zero_writes(lambda: atomic_write_text(record, json.dumps(settings) + "\n"))  # last: it vouches for the folder
        manifest = finish(lambda dest: heal(compressed, dest, heal_config, teacher=path, resume=args.resume,
                                            partial=partial, stop_after=args.stop_after))
        if manifest is None:
            print(f"stopped after {args.stop_after} healing steps; the checkpoint is in {partial}: "
                  "run the same command with --resume to go on")
            return
    print(rank_table(manifest))
    if manifest["method"] != "none":  # "none": a dense source whose K/V alone were factorised
        print(f"{manifest['method']} ratio {manifest['achieved_ratio']:.4f} of the decoder's linear parameters "
              f"removed; whole model {manifest['model_ratio']:.4f}")
    if healing := manifest.get("healing"):
        _print_healing(healing)
    if quantization := manifest.get("quantization"):
        _print_quantization(quantization)
    print(f"wrote {out}")
    if kv := manifest.get("kv_latent"):
        print(f"KV cache: {kv['achieved_kv_ratio']:.4f} of its bytes removed ({kv['schedule']} ranks, "
              f"target {kv['kv_ratio']})")


def cmd_heal(args: argparse.Namespace) -> None:
    from engine.model.checkpoint import read_manifest

    from .heal import heal, unhealable

    folder = resolve_model(args.folder)
    if problem := unhealable(folder, read_manifest(folder) if folder.is_dir() else None):
        raise UsageError(problem)
    manifest = read_manifest(folder)
    out = _output_folder(args)
    inside = folder.resolve() == out.resolve() or out.resolve() in folder.resolve().parents
    if inside or folder.resolve() == out.resolve().with_name(f"{out.name}.partial"):
        raise UsageError(f"--out {out} would replace the folder being healed: write the healed model elsewhere")
    calib = Path(args.calib) if args.calib else default_text(DEFAULT_CALIB, "--calib")
    config = _heal_config(args, args.steps, calib, args.device or "cpu")
    if config.max_ratio is not None and config.max_ratio < manifest["achieved_ratio"]:
        raise UsageError(f"--max-ratio {config.max_ratio} is below the folder's ratio {manifest['achieved_ratio']:.4f}")
    result = heal(folder, out, config, teacher=args.teacher, resume=args.resume, stop_after=args.stop_after)
    if result is None:
        print(f"stopped after {args.stop_after} steps; the checkpoint is in {out}.partial: "
              "run the same command with --resume to go on")
        return
    _print_healing(result["healing"])
    print(f"wrote {out}")


def cmd_quantize(args: argparse.Namespace) -> None:
    from engine.model.checkpoint import read_manifest

    from .quantize import quantize_folder, refuse_quantized

    folder = resolve_model(args.folder)
    refuse_quantized(folder, read_manifest(folder), "quantise")
    config = _quant_config(folder, args)
    out = _output_folder(args)
    if folder.resolve() == out.resolve():
        raise UsageError(f"--out {out} is the folder being quantised: write the quantised model elsewhere")
    _print_quantization(quantize_folder(folder, out, config)["quantization"])
    print(f"wrote {out}")


def _quant_config(folder: Path, args: argparse.Namespace):
    """--bits, --group and --rounding (with the calibration options GPTQ reads) checked against the
    folder's widths before any work."""
    from engine import ModelConfig

    from .quantize import DEFAULT_ROUNDING, QuantConfig, check_widths

    ModelConfig.from_folder(folder)  # a missing or unsupported model fails first
    rounding = args.rounding or DEFAULT_ROUNDING[args.bits]
    calib = None
    if rounding == "gptq":
        calib = str(Path(args.calib) if args.calib else default_text(DEFAULT_CALIB, "--calib"))
    config = QuantConfig(bits=args.bits, group=args.group, rounding=rounding, calib=calib, samples=args.samples,
                         seq_len=args.seq_len, head=not args.keep_head, device=args.device or "cpu", seed=args.seed)
    check_widths(folder, config.group)
    return config


def _print_quantization(quantization: dict) -> None:
    size = quantization["bytes"]
    head = "int8 head" if quantization.get("head") else "float head"
    print(f"int{quantization['bits']} weights in groups of {quantization['group']} ({quantization['rounding']}, "
          f"{head}): tensors {size['before'] / 1e6:.1f} MB -> {size['after'] / 1e6:.1f} MB")


HEAL_OPTIONS = {"max_ratio": None, "heal_mode": "full", "heal_lr": None, "heal_batch_size": 4, "heal_seq_len": 256,
                "train_dense": False, "freeze_norms": False, "hidden_weight": 0.0, "resume": False, "stop_after": None}


def _heal_options_given(args: argparse.Namespace) -> list[str]:
    """Healing's options set away from their defaults (`_add_heal_options`), as the user spelled them."""
    return ["--" + name.replace("_", "-") for name, default in HEAL_OPTIONS.items() if getattr(args, name) != default]


def _output_folder(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    if out.exists() and not args.force:
        raise UsageError(f"output folder {out} exists; pass --force to replace it")
    return out


def _heal_config(args: argparse.Namespace, steps: int, calib: Path, device: str):
    from .heal import HealConfig

    return HealConfig(steps=steps, mode=args.heal_mode, lr=args.heal_lr, batch_size=args.heal_batch_size,
                      seq_len=args.heal_seq_len, max_ratio=args.max_ratio, train_dense=args.train_dense,
                      train_norms=not args.freeze_norms, hidden_weight=args.hidden_weight, fsdp=args.fsdp,
                      calib=str(calib), device=device, seed=args.seed)


def _print_healing(healing: dict) -> None:
    lo, hi = healing["ratios"]
    served = f"serves ratios {lo:.4f}-{hi:.4f}" if hi > lo else f"at ratio {lo:.4f}"
    print(f"healed {healing['config']['steps']} steps ({healing['config']['mode']}, {served}): KL to the teacher "
          f"{healing['first_kl']:.4f} -> {healing['final_kl']:.4f} nats (means of the first and last tenth), "
          f"{healing['seconds']:.0f} s, peak RSS {healing['peak_rss_mib']} MiB")


def cmd_generate(args: argparse.Namespace) -> None:
    from engine import LLM, SamplingParams

    path = resolve_model(args.model)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    llm = LLM(path, dtype=args.dtype, device=args.device, ratio=args.ratio, kv_cache_dtype=args.kv_cache_dtype,
              int8_activations=args.int8_activations, tensor_parallel_size=args.tensor_parallel_size)
    prompt = llm.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    for delta in llm.stream(prompt, params):
        print(delta.text, end="", flush=True)
    print()


def cmd_serve(args: argparse.Namespace) -> None:
    from engine.server import serve

    given = {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
             "max_model_len": args.max_model_len, "kv_cache_memory": args.kv_cache_memory,
             "kv_cache_dtype": args.kv_cache_dtype, "int8_activations": args.int8_activations,
             "tensor_parallel_size": args.tensor_parallel_size}
    settings = {k: v for k, v in given.items() if v is not None}
    if args.no_prefix_caching:
        settings["enable_prefix_caching"] = False
    serve(resolve_model(args.model), host=args.host, port=args.port, served_model_name=args.served_model_name,
          api_key=args.api_key, dtype=args.dtype, device=args.device, ratio=args.ratio,
          shutdown_grace=args.shutdown_grace, max_sequences_per_request=args.max_sequences_per_request, **settings)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lowrank", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="fetch a registered model into models/NAME as an HF folder")
    p.add_argument("name", help=f"one of: {', '.join(sorted(REGISTRY))}")
    p.add_argument("--models-dir", help="where models live (default: $LOWRANK_MODELS_DIR or ./models)")
    p.set_defaults(run=cmd_pull)

    p = sub.add_parser("eval", help="held-out perplexity of a model folder")
    p.add_argument("model", help="model folder, or a pulled model's name")
    p.add_argument("--text", help="UTF-8 text file (default: ../shared/corpus/pydocs/valid.txt)")
    p.add_argument("--ctx", type=positive_int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--stride", type=positive_int, help="tokens between window starts (default: ctx, disjoint windows)")
    p.add_argument("--max-chars", type=positive_int, help="use only the first N characters of the text")
    p.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--json", help="also write the result to this JSON file")
    _add_model_options(p)
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("compress", help="compress a model folder's weights (svd, svd-llm, soco) and/or KV cache")
    p.add_argument("model", help="model folder, or a pulled model's name")
    p.add_argument("--ratio", type=float, help="fraction of decoder linear parameters to remove")
    p.add_argument("--method", default="soco", choices=["svd", "svd-llm", "soco"])
    p.add_argument("--kv-ratio", type=float, help="fraction of KV-cache bytes to remove (LoRC latent K/V)")
    p.add_argument("--kv-schedule", default="progressive", choices=["progressive", "uniform"],
                   help="per-layer KV ranks: from measured sensitivity (default) or uniform")
    p.add_argument("--calib", help="calibration text (default: ../shared/corpus/pydocs/train.txt)")
    p.add_argument("--samples", type=positive_int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seq-len", type=positive_int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--steps", type=positive_int, default=600, help="SoCo training steps (default 600)")
    p.add_argument("--batch-size", type=positive_int, default=2, help="SoCo windows per step (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu or cuda (default cpu)")
    p.add_argument("--heal-steps", type=positive_int, help="then heal the factors by distillation for N steps")
    _add_parallel_options(p)
    _add_heal_options(p)
    _add_quant_options(p, required=False)
    _add_output_options(p)
    p.set_defaults(run=cmd_compress)

    p = sub.add_parser("heal", help="train a compressed folder's factors by distillation from its dense teacher")
    p.add_argument("folder", help="a compressed folder (the output of `lowrank compress`)")
    p.add_argument("--steps", type=positive_int, required=True, help="training steps")
    p.add_argument("--teacher", help="the dense folder it was compressed from (default: the one lowrank.json names)")
    p.add_argument("--calib", help="distillation text (default: ../shared/corpus/pydocs/train.txt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu or cuda (default cpu)")
    _add_parallel_options(p)
    _add_heal_options(p)
    _add_output_options(p)
    p.set_defaults(run=cmd_heal)

    p = sub.add_parser("quantize", help="store a folder's decoder linears (dense or factorised) as int8 / int4")
    p.add_argument("folder", help="a model folder (dense, compressed, healed or with latent K/V), or a pulled name")
    _add_quant_options(p, required=True)
    p.add_argument("--calib", help="gptq: calibration text (default: ../shared/corpus/pydocs/train.txt)")
    p.add_argument("--samples", type=positive_int, default=128, help="gptq: calibration windows (default 128)")
    p.add_argument("--seq-len", type=positive_int, default=512, help="gptq: tokens per window (default 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu or cuda for the calibration pass (default cpu)")
    _add_parallel_options(p, training=False)
    _add_output_options(p)
    p.set_defaults(run=cmd_quantize)

    p = sub.add_parser("generate", help="generate a completion (or a chat reply with --chat)")
    p.add_argument("model", help="model folder, or a pulled model's name")
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-tokens", type=positive_int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)")
    p.add_argument("--seed", type=int, help="seed for sampling: same seed, same text")
    _add_model_options(p)
    _add_tensor_parallel_option(p)
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    p.add_argument("model", help="model folder, or a pulled model's name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port_number, default=8000)
    p.add_argument("--served-model-name", help="the name clients pass as `model` (default: the folder's name)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health and /metrics")
    p.add_argument("--max-num-seqs", type=positive_int, help="sequences batched together at most (default 64)")
    p.add_argument("--max-num-batched-tokens", type=positive_int, help="tokens per engine step (default 2048)")
    p.add_argument("--max-model-len", type=positive_int, help="prompt + completion tokens (default: the model's limit)")
    p.add_argument("--kv-cache-memory", type=positive_int, help="bytes for the KV cache (default 1 GiB on CPU)")
    p.add_argument("--no-prefix-caching", action="store_true", help="turn prefix caching off")
    p.add_argument("--shutdown-grace", type=seconds, default=30.0,
                   help="seconds SIGTERM / Ctrl-C waits for requests in flight before aborting them (default 30)")
    p.add_argument("--max-sequences-per-request", type=positive_int,
                   help="prompts x n one request may ask for (default 256)")
    _add_model_options(p)
    _add_tensor_parallel_option(p)
    p.set_defaults(run=cmd_serve)
    return parser


def _add_heal_options(p: argparse.ArgumentParser) -> None:
    """Healing's options, shared by `compress --heal-steps` and `heal` (converters.heal documents each)."""
    p.add_argument("--max-ratio", type=ratio_value,
                   help="train every rank prefix up to this ratio, so the folder serves any ratio in between")
    p.add_argument("--heal-mode", default=HEAL_OPTIONS["heal_mode"], choices=["full", "lora"],
                   help="train the factors themselves (default) or a LoRA on them, merged at the end")
    p.add_argument("--heal-lr", type=positive_float, help="relative learning rate (default 1e-3 full, 3e-3 lora)")
    p.add_argument("--heal-batch-size", type=positive_int, default=HEAL_OPTIONS["heal_batch_size"],
                   help="windows per step (default 4)")
    p.add_argument("--heal-seq-len", type=positive_int, default=HEAL_OPTIONS["heal_seq_len"],
                   help="tokens per window (default 256)")
    p.add_argument("--train-dense", action="store_true", help="also train the linears left dense")
    p.add_argument("--freeze-norms", action="store_true", help="keep the RMSNorm weights as they are (trained by default)")
    p.add_argument("--hidden-weight", type=float_in(lambda v: 0 <= v < float("inf"), "a finite number >= 0"),
                   default=HEAL_OPTIONS["hidden_weight"],
                   help="weight of a per-layer hidden-state term beside the KL (default 0: KL only)")
    p.add_argument("--resume", action="store_true", help="go on from the checkpoint in <out>.partial")
    p.add_argument("--stop-after", type=positive_int,
                   help="checkpoint and stop after N steps of this run (go on later with --resume)")


def _add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")


def _add_parallel_options(p: argparse.ArgumentParser, training: bool = True) -> None:
    p.add_argument("--nproc", type=positive_int, default=1,
                   help="data-parallel ranks on this machine (one per GPU with --device cuda; default 1); "
                        "under torchrun the ranks are torchrun's")
    if training:
        p.add_argument("--fsdp", action="store_true",
                       help="with --nproc / torchrun: shard SoCo's and healing's student and teacher across the ranks "
                            "(FSDP) instead of replicating them, for factors that do not fit one device")


def _add_quant_options(p: argparse.ArgumentParser, required: bool) -> None:
    """Quantisation's options, shared by `quantize` and `compress --bits` (converters.quantize documents them)."""
    p.add_argument("--bits", type=int, choices=[8, 4], required=required,
                   help="weight-only int8 or int4 for every decoder linear" + ("" if required else " (last stage)"))
    p.add_argument("--group", type=positive_int,
                   help="input channels per scale; must divide every layer's input width (default 64 int8, 32 int4)")
    p.add_argument("--keep-head", action="store_true",
                   help="leave the head (the tied token table) float; by default it is stored int8")
    p.add_argument("--rounding", choices=["rtn", "gptq"],
                   help="round-to-nearest, or GPTQ's error feedback on calibration inputs (default rtn int8, gptq int4)")


def _add_tensor_parallel_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensor-parallel-size", type=positive_int, default=1,
                   help="cut the model across N processes (one per GPU on CUDA; default 1)")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", help="float32, float16 or bfloat16 (default: float32 on CPU, the checkpoint's on GPU)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--ratio", type=float, help="compressed folders: serve a smaller rank prefix at this ratio")
    p.add_argument("--kv-cache-dtype", choices=KV_DTYPES, default="auto",
                   help="auto: the model's dtype; float16; int8: K/V as int8 with a scale per vector (default auto)")
    p.add_argument("--int8-activations", action="store_true",
                   help="CPU, int8/int4 weights: multiply by int8-rounded inputs where the CPU has VNNI")


def main(argv: list[str] | None = None) -> int:
    from engine.model.config import ModelFolderError

    from . import data_parallel

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "nproc", 1) > 1 and "WORLD_SIZE" not in os.environ:  # start the ranks; each runs main
            data_parallel.check_nproc(args.nproc, args.device or "cpu")
            return data_parallel.launch(args.nproc, argv, "converters.cli")
        if (world := int(os.environ.get("WORLD_SIZE", "1"))) > 1:  # under torchrun
            if hasattr(args, "nproc"):  # data-parallel compression: every rank calibrates and trains
                data_parallel.init_from_environment(args.device or "cpu")
            elif getattr(args, "tensor_parallel_size", 1) != world:  # serving: rank 0 serves, the others step
                raise UsageError(f"torchrun started {world} processes: give --tensor-parallel-size {world}"
                                 if hasattr(args, "tensor_parallel_size") else "runs as one process: start it "
                                 "without torchrun")
            if int(os.environ.get("RANK", "0")) != 0:  # rank 0 reports; the others would repeat it
                sys.stdout = open(os.devnull, "w")
        args.run(args)
    except (UsageError, ModelFolderError, PullError, ValueError) as exc:
        print(f"lowrank {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lowrank {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
