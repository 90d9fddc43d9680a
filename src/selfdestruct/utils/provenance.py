"""Where a number was made: package versions, threads, processor, kernel path, accelerator, Python.

Every ``metrics.json`` carries :func:`environment` under ``"environment"``. The floating-point path of a
run depends on more than the seed (which SIMD kernels torch dispatches to, which BLAS code path MKL takes,
how many threads reduce a sum), so two runs are only comparable bit for bit when their
:func:`numerics_fingerprint` agree; the report warns when it compares runs whose fingerprints differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from functools import lru_cache
from importlib import metadata

# Packages whose version can change a number this project reports.
PACKAGES = ("selfdestruct", "torch", "pytorch-lightning", "torchmetrics", "transformers", "tokenizers", "peft",
            "safetensors", "numpy", "hydra-core", "omegaconf", "wandb")
# Environment variables that select kernels or threads (recorded when set).
NUMERIC_ENV = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_CORETYPE",
               "CUBLAS_WORKSPACE_CONFIG", "SELFDESTRUCT_REPRODUCIBLE")
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "OPENBLAS_CORETYPE", "CUBLAS_WORKSPACE_CONFIG")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=4)
def _first_processor(cpuinfo: str = "/proc/cpuinfo") -> tuple[tuple[str, str], ...]:
    """The ``key: value`` fields of the first processor in ``cpuinfo`` (empty where there is no such file)."""
    fields = []
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields.append((key.strip(), value.strip()))
    except OSError:
        pass
    return tuple(fields)


def cpu_model() -> str:
    """The processor's marketing name (``/proc/cpuinfo`` on Linux, ``platform`` elsewhere)."""
    return dict(_first_processor()).get("model name") or platform.processor() or platform.machine()


def cpu_id(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """``vendor cpu family F model M stepping S`` of the first processor in ``cpuinfo`` (None without one): it
    names the microarchitecture where the marketing name does not (a virtual machine may show only "AMD EPYC").
    Not part of :func:`numerics_fingerprint`, so runs recorded before it existed stay comparable."""
    fields = dict(_first_processor(cpuinfo))
    if "vendor_id" not in fields:
        return None
    return " ".join([fields["vendor_id"]] + [f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping")
                                             if k in fields])


def gemm_gflops(size: int = 512, seconds: float = 0.5) -> float:
    """The host's float32 matrix-multiply throughput on one torch thread, in GFLOP/s: ``size``³ products
    repeated for about ``seconds`` after one warm-up, the best of three rounds; torch's thread count and random
    stream are left as they were. The embedded default's training is mostly such products (two thirds of a CTRAP
    step on CPU), so this rate, not the clock or the core count, says how fast a host runs the demo."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)  # its own: the caller's random stream is left as it was
        a, b = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
        a @ b
        start = time.perf_counter()
        a @ b
        repeats = max(1, round(seconds / 3 / max(time.perf_counter() - start, 1e-6)))
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(repeats):
                a @ b
            best = min(best, (time.perf_counter() - start) / repeats)
    finally:
        torch.set_num_threads(threads)
    return 2 * size**3 / best / 1e9


def environment() -> dict:
    """The run's software and hardware provenance, JSON-ready."""
    import torch

    gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_id": cpu_id(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl": bool(torch.backends.mkl.is_available()),
        "gpus": gpus,
        "cuda": torch.version.cuda if gpus else None,
        "env": {k: os.environ[k] for k in NUMERIC_ENV if k in os.environ},
    }


FINGERPRINT_KEYS = ("python", "packages", "torch_threads", "cpu", "cpu_capability", "gpus", "cuda")
STAGE_FINGERPRINT_KEYS = ("torch_threads", "cpu", "cpu_capability", "gpus")  # a stage record's share of them


def stage_record(stage: str) -> dict:
    """Where a stage that trains weights ran (its thread count, processor, kernel path and kernel-selecting
    variables), for the saved model's lineage (``made_in``): on some hosts the thread count alone changes the
    weights, and a cached stage is reused by runs with other settings."""
    env = environment()
    return {"stage": stage, **{k: env[k] for k in (*STAGE_FINGERPRINT_KEYS, "cpu_id")},
            "env": {k: v for k, v in env["env"].items() if k in KERNEL_ENV}}


def stage_fingerprint(record: dict) -> str:
    """A short hash of where one stage of a model's lineage ran: :func:`numerics_fingerprint` of its record."""
    return numerics_fingerprint(record, STAGE_FINGERPRINT_KEYS)


def describe_stage(record: dict) -> str:
    """``2 threads, AVX512 on AMD EPYC`` (and the kernel-selecting variables set)."""
    extra = _kernel_variables(record)
    return f"{record.get('torch_threads')} threads, {record.get('cpu_capability')} on {_where(record)}" + \
        (f", {extra}" if extra else "")


def numerics_fingerprint(env: dict | None, keys: tuple[str, ...] = FINGERPRINT_KEYS) -> str:
    """A short hash of what decides the floating-point path (not the host name or the date)."""
    if not env:
        return "unknown"
    described = {k: env.get(k) for k in keys}
    # thread-count variables are already in torch_threads (joblib workers set them, plain runs may not)
    described["env"] = {k: v for k, v in (env.get("env") or {}).items() if k in KERNEL_ENV}
    blob = json.dumps(described, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _where(env: dict) -> str:
    """The GPUs an environment names, else its CPU."""
    return ", ".join(env.get("gpus") or []) or env.get("cpu", "?")


def _kernel_variables(env: dict) -> str:
    """``ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE``: the recorded variables, as set."""
    return " ".join(f"{k}={v}" for k, v in (env.get("env") or {}).items())


def describe(env: dict) -> str:
    """One line for humans: ``torch 2.13.0, AVX512 on Intel(R) Xeon(R) ..., 2 threads, Python 3.11.7``."""
    packages = env.get("packages") or {}
    extra = _kernel_variables(env)
    return (f"torch {packages.get('torch')}, {env.get('cpu_capability')} on {_where(env)}, {env.get('torch_threads')} "
            f"threads, Python {env.get('python')}" + (f", {extra}" if extra else ""))
