"""Saving and loading models as Hugging Face directories (safetensors only, no remote code)."""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfdestruct.errors import UserError
from selfdestruct.utils.io import publish_dir, staging_dir

PROVENANCE_FILE = "selfdestruct.json"
PICKLE_WEIGHTS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
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
    path = Path(model_dir).expanduser()
    if not path.exists() and _looks_like_hub_id(str(model_dir)):
        path = str(model_dir)  # type: ignore[assignment]  # resolved by transformers (online only)
    elif not path.is_dir():
        raise UserError(f"{key}={model_dir}: no such directory (expected a model/ directory written by "
                        "selfdestruct.defend or a local Hugging Face checkpoint)")
    else:
        check_model_files(path, key)
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


def safetensors_header(file: Path, key: str) -> dict[str, Any]:
    """The JSON header of a safetensors file, after checking the file holds every byte the header promises."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size - 8:
                raise ValueError
            header = json.loads(handle.read(length))
        ends = [int(t["data_offsets"][1]) for name, t in header.items() if name != "__metadata__"]
    except (struct.error, ValueError, KeyError, TypeError, IndexError):
        raise UserError(f"{key}: {file} is corrupt (not a readable safetensors header)") from None
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        raise UserError(f"{key}: {file} is truncated ({size} of {expected} bytes): copy or save it again")
    return header


def check_model_files(path: Path, key: str) -> None:
    """A local model directory's files, checked before any work: config, safetensors weights (complete, not
    pickle-only), a tokenizer, and a ``vocab_size`` equal to the embedding's rows. Raises UserError naming the
    path and the problem."""
    if not (path / "config.json").exists():
        raise UserError(f"{key}={path}: not a Hugging Face model directory (no config.json)")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickled = sorted({p.name for pattern in PICKLE_WEIGHTS for p in path.glob(pattern)})
        if pickled:
            raise UserError(f"{key}={path}: weights in pickle format only ({', '.join(pickled)}); selfdestruct loads "
                            "safetensors only (convert with save_pretrained(..., safe_serialization=True))")
        raise UserError(f"{key}={path}: no *.safetensors weights")
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError):
            raise UserError(f"{key}: {index} is corrupt (no weight_map)") from None
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise UserError(f"{key}: {index} lists {missing[0]}, which is missing")
    headers = {file: safetensors_header(file, key) for file in weights}
    try:
        config = json.loads((path / "config.json").read_text())
    except ValueError:
        raise UserError(f"{key}: {path / 'config.json'} is not valid JSON") from None
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise UserError(f"{key}={path}: no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    rows = _embedding_rows(headers)
    vocab = config.get("vocab_size") if isinstance(config, dict) else None
    if rows is not None and isinstance(vocab, int) and vocab != rows:
        raise UserError(f"{key}: {path / 'config.json'} says vocab_size={vocab} but the embedding in the "
                        f"safetensors weights has {rows} rows")


def _embedding_rows(headers: dict[Path, dict[str, Any]]) -> int | None:
    for header in headers.values():
        for name, tensor in header.items():
            if name.endswith("embed_tokens.weight") and isinstance(tensor, dict) and tensor.get("shape"):
                return int(tensor["shape"][0])
    return None


def _check_vocabulary(tokenizer, rows: int, path, key: str) -> None:
    """Every id the tokenizer can produce must index a row of the model's embedding (a mismatched tokenizer)."""
    if len(tokenizer) > rows:
        raise UserError(f"{key}={path}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has "
                        f"{rows} rows (a tokenizer of another model?)")


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))
