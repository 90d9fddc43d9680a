"""A model directory's files checked before any work, without torch or transformers: the commands call these
while checking the config, so a wrong ``model_path`` is refused before the heavy imports."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from selfdestruct.errors import UserError

PICKLE_WEIGHTS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def check_model_location(model_dir: str | Path, key: str) -> Path | str:
    """Where ``model_dir`` loads from: a local directory whose files pass :func:`check_model_files`, or a hub id
    (``org/name``, left to transformers, online only) when no such local path exists. Raises UserError naming
    ``key`` otherwise."""
    path = Path(str(model_dir)).expanduser()
    if not path.exists() and _looks_like_hub_id(str(model_dir)):
        return str(model_dir)
    if not path.is_dir():
        raise UserError(f"{key}={model_dir}: no such directory (expected a model/ directory written by "
                        "selfdestruct.defend or a local Hugging Face checkpoint)")
    check_model_files(path, key)
    return path


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


def _embedding_rows(headers: dict[Path, dict[str, Any]]) -> int | None:
    for header in headers.values():
        for name, tensor in header.items():
            if name.endswith("embed_tokens.weight") and isinstance(tensor, dict) and tensor.get("shape"):
                return int(tensor["shape"][0])
    return None


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))
