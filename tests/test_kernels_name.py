"""Our import package `kernels` shares its name with Hugging Face's hub-kernels package, which
transformers probes for. With ours installed, transformers must run a Llama forward pass exactly
as without it, and never import our package (see the README's note on the name)."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import json, sys
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import import_utils

torch.manual_seed(0)
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
model = LlamaForCausalLM(config).eval()
with torch.no_grad():
    logits = model(torch.randint(0, 64, (1, 8))).logits
found, version = import_utils._is_package_available("kernels", return_version=True)
print(json.dumps({
    "finite": bool(torch.isfinite(logits).all()),
    "shape": list(logits.shape),
    "kernels_imported": "kernels" in sys.modules,
    "hub_kernels_available": import_utils.is_kernels_available(),
    "probe_found": found,
    "probe_version": version,
    "accepted_range": [import_utils.KERNELS_MIN_VERSION, import_utils.KERNELS_MAX_VERSION],
}))
"""


def test_transformers_does_not_pick_up_our_kernels_package():
    # A fresh interpreter: nothing of ours imported before transformers probes.
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, cwd="/")
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["finite"] and report["shape"] == [1, 8, 64]
    assert report["probe_found"]  # the clash is real: find_spec("kernels") sees our package...
    assert not report["hub_kernels_available"], report  # ...but the hub-kernel path stays off
    assert not report["kernels_imported"], "transformers imported our `kernels` package"


def test_our_kernels_is_the_one_installed():
    import kernels

    assert Path(kernels.__file__).resolve().parent == Path(__file__).resolve().parents[1] / "kernels"
