"""Saving and loading models as Hugging Face directories (safetensors only, no remote code)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfdestruct.errors import UserError
from selfdestruct.models.files import check_model_location
from selfdestruct.utils.io import publish_dir, staging_dir

PROVENANCE_FILE = "selfdestruct.json"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise UserError(f"model.dtype={name!r} is not one of {sorted(_DTYPES)}") from None


def save_model_dir(model, tokenizer, out_dir: str | Path, provenance: dict[str, Any]) -> Path:
    """Write model (safetensors), tokenizer and provenance into ``out_dir`` atomically."""
    out_dir = Path(out_dir)
    tmp = staging_dir(out_dir)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True, default=str))
        publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_provenance(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


@dataclass(frozen=True)
class LoadOptions:
    """How checkpoints are loaded (``conf/model``): precision, attention kernel, memory savers, trust."""

    dtype: str = "float32"
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False


def load_model_dir(model_dir: str | Path, key: str = "model_path", options: LoadOptions = LoadOptions()):
    """Load ``(model, tokenizer)`` from a local HF directory; ``key`` names the config key in errors.

    A hub id (``org/name``) also works when the machine is online and the directory does not exist locally.
    """
    dtype, attn_implementation = options.dtype, options.attn_implementation
    trust_remote_code = options.trust_remote_code
    path = check_model_location(model_dir, key)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype), "trust_remote_code": trust_remote_code,
                              "use_safetensors": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - transformers/tokenizers raise many types for unreadable files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{key}={model_dir}: cannot load model: {first}") from err
    _check_vocabulary(tokenizer, model.get_input_embeddings().num_embeddings, path, key)
    if tokenizer.pad_token_id is None:  # many base/chat checkpoints ship without one: pad with EOS
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if options.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model, tokenizer


def _check_vocabulary(tokenizer, rows: int, path, key: str) -> None:
    """Every id the tokenizer can produce must index a row of the model's embedding (a mismatched tokenizer)."""
    if len(tokenizer) > rows:
        raise UserError(f"{key}={path}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has "
                        f"{rows} rows (a tokenizer of another model?)")
