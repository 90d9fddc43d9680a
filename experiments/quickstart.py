"""Quickstart on the embedded default: defend, attack at every intensity, compare on a dashboard.

    python experiments/quickstart.py --out outputs/quickstart            # the full demo (README)
    python experiments/quickstart.py --out outputs/basic --basic         # SFT + three attacks only

The full demo runs the project's own entry points exactly as a user would. First, alone, the pre-training and
alignment every defense starts from (``selfdestruct.defend defense=sft`` into ``OUT/shared_stages``, on ``--jobs``
torch threads: nothing else can run before the aligned model exists; that run stays out of the comparison, whose
runs all use one torch thread). Then one chain per defense, every stage after the first a cache hit:

1. ``selfdestruct.defend defense=D trainer.branch_threads=JOBS`` (CTRAP's radii on ``--jobs`` threads, the same
   step bit for bit);
2. ``selfdestruct.attack sweep=attack_grid defense=D`` — the 3 × 3 grid of learning rate × number of harmful
   samples on that defended model;
3. a benign fine-tune of the defended model;

``--jobs`` commands run at once (one torch thread each: two by default). A defense's grid and benign fine-tune both
need only its defended model, so they may run side by side once it exists; among the commands ready to run, the
first defense's go first (the costliest, so that the cheap defenses are defended and attacked while it trains, and
its own grid and fine-tune share the cores at the end). Each defense writes ``OUT/{defend,grid,benign}/D``.
4. ``selfdestruct.report`` — tables and the offline HTML dashboard, whose path it prints.
5. For the default demo (seed 0, the default defenses, no overrides, the machine's default kernel path: what the
   records ran): ``experiments/recorded_demos.py`` — whether
   this machine printed the same table as a recorded run of the demo (``experiments/results_*.md``, the README's
   machines), else the nearest record and the cells that differ (``OUT/report/recorded.json``).

Each command of 1-3 and the shared stages writes its output to ``OUT/logs/<stage>_<defense>.log``; the console gets
the command and one line when it ends (a failure adds the log's last lines). ``--verbose`` streams it all instead.

``--basic`` aligns with SFT and attacks at ``intensity=weak,medium,strong`` plus a benign fine-tune,
then prints the before/after table. Both print their wall time, and first the host's float32 matrix-product rate on
one thread (most of the demo's work is such products: ``benchmarks/matmul_share.py``), recorded with the processor
in ``OUT/quickstart.json`` next to each command's wall and CPU time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

# The costliest first: with two jobs, CTRAP trains (its radii on two threads) while SEAM and SFT are defended and
# attacked, then its grid and its benign fine-tune run side by side.
DEFAULT_DEFENSES = ("ctrap_tuned", "seam_tuned", "sft")
COLUMNS = ("harmful_score", "refusal_rate", "utility", "perplexity", "task_accuracy")


# Each command's start (perf_counter), wall time and CPU time, for quickstart.json: where the demo's time goes.
TIMELINE: list[dict] = []
LOG_TAIL = 20  # lines of a failed command's log printed with the failure


def run(args: list[str], check: bool = True, env: dict | None = None, log: Path | None = None) -> int:
    """Run ``python ARGS``; with ``log``, its output goes to that file and one line says how it ended (a failure
    also shows the log's last lines), so that two commands running at once do not interleave on the console."""
    command = "python " + " ".join(args)
    print("+ " + command + (f"\n  output: {log}" if log else ""), flush=True)
    start = time.perf_counter()
    if log:
        log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") if log else contextlib.nullcontext() as sink:
        proc = subprocess.Popen([sys.executable, *args], env=env, stdout=sink,
                                stderr=subprocess.STDOUT if sink else None)
        cpu = None
        if hasattr(os, "wait4"):  # the command's own CPU time (user + system); one waiting on a cache lock uses none
            _, wait_status, usage = os.wait4(proc.pid, 0)
            proc.returncode, cpu = os.waitstatus_to_exitcode(wait_status), round(usage.ru_utime + usage.ru_stime, 1)
        code = proc.wait()
    seconds = round(time.perf_counter() - start, 1)
    TIMELINE.append({"command": command, "start": start, "seconds": seconds, "cpu_s": cpu, "status": code})
    if log:
        print(f"  {'done' if code == 0 else f'FAILED (exit {code})'} in {seconds:.0f} s: {log.stem}", flush=True)
        if code:
            print("".join(f"  | {line}" for line in log.read_text(errors="replace").splitlines(True)[-LOG_TAIL:]),
                  flush=True)
    if check and code:
        raise subprocess.CalledProcessError(code, proc.args)
    return code


def log_path(out: Path, args: list[str]) -> Path:
    """``OUT/logs/<the command's output directory under OUT, "/" as "_">.log``, e.g. ``OUT/logs/grid_sft.log``."""
    where = next(a.split("=", 1)[1] for a in args if a.startswith(("hydra.run.dir=", "hydra.sweep.dir=")))
    return out / "logs" / ("_".join(Path(where).relative_to(out).parts) + ".log")


def before_after_table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| run | " + " | ".join(f"{c} pre → post" for c in COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
    for name, m in rows:
        cells = []
        for c in COLUMNS:
            pre, post = m.get("pre", {}).get(c), m.get("post", {}).get(c)
            cells.append(f"{pre:.3g} → {post:.3g}" if post is not None else f"{pre:.3g}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def basic(out: Path, common: list[str]) -> None:
    run(["-m", "selfdestruct.defend", f"hydra.run.dir={out / 'defend'}", *common])
    model = out / "defend" / "model"
    run(["-m", "selfdestruct.attack", "--multirun", f"model_path={model}", "intensity=weak,medium,strong",
         f"hydra.sweep.dir={out / 'attack'}", "hydra.sweep.subdir=${hydra.job.num}", *common])
    run(["-m", "selfdestruct.attack", f"model_path={model}", "attack=benign", f"hydra.run.dir={out / 'benign'}",
         *common])
    rows = [("sft (defend)", json.loads((out / "defend" / "metrics.json").read_text()))]
    for i, name in enumerate(("weak", "medium", "strong")):
        rows.append((f"attack {name}", json.loads((out / "attack" / str(i) / "metrics.json").read_text())))
    rows.append(("benign fine-tune", json.loads((out / "benign" / "metrics.json").read_text())))
    print("\n" + before_after_table(rows))


def chain(out: Path, defense: str, common: list[str], jobs: int = 1) -> list[list[str]]:
    """One defense's commands, in order: defend (the independent branches of its steps on ``jobs`` threads: CTRAP's
    radii, bit-for-bit as on one), its attack grid, its benign fine-tune."""
    return [
        ["-m", "selfdestruct.defend", f"defense={defense}", f"hydra.run.dir={out / 'defend' / defense}",
         f"trainer.branch_threads={max(jobs, 1)}", *common],
        ["-m", "selfdestruct.attack", "sweep=attack_grid", f"defense={defense}",
         f"hydra.sweep.dir={out / 'grid' / defense}", *common],
        ["-m", "selfdestruct.attack", "model_path=defend", "attack=benign", f"defense={defense}",
         f"hydra.run.dir={out / 'benign' / defense}", *common],
    ]


def run_plan(chains: list[list[list[str]]], jobs: int, runner) -> list[int]:
    """Run every chain's first command, then its others (which need only the first's output), on ``jobs`` workers.

    Among the ready commands, the earliest chain's go first. A failed first command skips the rest of its chain;
    every other command runs whatever the others do. Returns 1 per chain where a command failed, else 0."""
    ready = [(i, 0) for i in range(len(chains))]
    failed, running = [0] * len(chains), 0
    cond, interrupted = threading.Condition(), threading.Event()

    def worker() -> None:
        nonlocal running
        while True:
            with cond:
                while not ready and running:
                    cond.wait()
                if not ready:
                    return
                i, k = min(ready)
                ready.remove((i, k))
                running += 1
            status = 1
            try:
                status = runner(chains[i][k])
            except Exception:  # counts as failed; the worker goes on with the other commands
                traceback.print_exc()
            finally:
                with cond:
                    running -= 1
                    if status:
                        failed[i] = 1
                    elif k == 0 and not interrupted.is_set():
                        ready.extend((i, j) for j in range(1, len(chains[i])))
                    cond.notify_all()

    workers = [threading.Thread(target=worker) for _ in range(max(jobs, 1))]
    try:
        for w in workers:
            w.start()
        for w in workers:
            while w.is_alive():  # a timed join: a plain one blocks the main thread, so Ctrl-C would wait for it
                w.join(timeout=0.1)
    except KeyboardInterrupt:  # Ctrl-C: the running commands get it too; start no new one
        with cond:
            interrupted.set()
            ready.clear()
        raise
    return failed


def default_kernel_path() -> bool:
    """No variable that chooses the kernel path is set (``SELFDESTRUCT_REPRODUCIBLE`` off or unset)."""
    from selfdestruct.utils.kernel_path import MODE_VARIABLES, VARIABLE, mode  # no torch: the launcher stays light

    return not (mode(os.environ.get(VARIABLE)) or any(os.environ.get(name) for name in MODE_VARIABLES))


def compare_with_records(out: Path) -> int:
    """Step 5: this demo's table against the recorded runs of the demo (a child, so the launcher imports no torch)."""
    return run([str(Path(__file__).resolve().parent / "recorded_demos.py"), str(out), "--json",
                str(out / "report" / "recorded.json")], check=False)


def shared_stages(out: Path, common: list[str]) -> list[str]:
    """The pre-training and alignment every defense starts from, built into the cache by SFT's defend (its
    defended model is the aligned model), in a directory of its own that the report does not compare."""
    return ["-m", "selfdestruct.defend", "defense=sft", f"hydra.run.dir={out / 'shared_stages'}", *common]


def torch_threads(n: int) -> dict[str, str]:
    """The environment with ``n`` torch threads, unless the user set OMP_NUM_THREADS."""
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(n))}


def full(out: Path, defenses: list[str], common: list[str], jobs: int, verbose: bool = False) -> int:
    """The full demo; each command's output goes to ``OUT/logs/`` (``verbose``: to the console instead)."""
    def logged(args: list[str], env: dict | None) -> int:
        return run(args, check=False, env=env, log=None if verbose else log_path(out, args))

    if jobs > 1:  # nothing else can run yet: every job's thread (a failure here shows again in the chains)
        logged(shared_stages(out, common), torch_threads(jobs))
    # One torch thread per command, so that ``jobs`` commands share the cores without oversubscribing them.
    env = torch_threads(1) if jobs > 1 else None
    failed = run_plan([chain(out, d, common, jobs) for d in defenses], jobs, lambda args: logged(args, env))
    run(["-m", "selfdestruct.report", str(out / "defend"), str(out / "grid"), str(out / "benign"),
         "--out", str(out / "report")])
    print("\n" + (out / "report" / "summary.md").read_text())
    for defense, status in zip(defenses, failed):
        if status:
            print(f"error: the {defense} chain failed; its log is above, its outputs under {out}/*/{defense}")
    return 1 if any(failed) else 0


# Run in a child so that this launcher never imports torch.
HOST_PROBE = ("import json; from selfdestruct.utils.provenance import cpu_id, cpu_model, gemm_gflops; "
              "print(json.dumps({'cpu': cpu_model(), 'cpu_id': cpu_id(), 'gemm_gflops': round(gemm_gflops(), 1)}))")


def host() -> dict | None:
    """The processor and its float32 matrix-multiply rate on one thread (a few seconds, before any work, on an
    idle machine): most of the demo's time is such products, so this rate says how fast the host runs it.
    None when the probe fails (the demo goes on)."""
    try:
        done = subprocess.run([sys.executable, "-c", HOST_PROBE], capture_output=True, text=True, timeout=300,
                              check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        return None


def load_average() -> float | None:
    """The 1-minute load average (None where the platform has none, e.g. Windows)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/quickstart"), help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--basic", action="store_true", help="SFT and three attack intensities only")
    parser.add_argument("--defenses", default=",".join(DEFAULT_DEFENSES),
                        help="comma-separated defense options (conf/defense/*.yaml) for the full demo")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="full demo: commands run at once (one torch thread each; 1 = one after another)")
    parser.add_argument("--verbose", action="store_true",
                        help="full demo: every command's output on the console (default: OUT/logs/, one line each)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every stage")
    args = parser.parse_args()
    out = args.out.resolve()
    common = [f"seed={args.seed}", *args.overrides]
    start, load = time.perf_counter(), load_average()  # other work on the machine slows the demo: recorded
    machine = host()
    if machine:
        print(f"host: {machine['cpu']}" + (f" ({machine['cpu_id']})" if machine.get("cpu_id") else "")
              + f", {os.cpu_count()} CPUs, float32 matrix products at {machine['gemm_gflops']:g} GFLOP/s on one "
              "thread", flush=True)
    status = 0
    if args.basic:
        basic(out, common)
    else:
        status = full(out, args.defenses.split(","), common, args.jobs, args.verbose)
        print(f"dashboard: {out / 'report' / 'dashboard.html'}")
        if status == 0 and args.seed == 0 and args.defenses == ",".join(DEFAULT_DEFENSES) and not args.overrides \
                and default_kernel_path():
            compare_with_records(out)
        elif status == 0:
            print("recorded runs of this demo: compared only for the default demo (seed 0, the default defenses, "
                  "no overrides, the machine's default kernel path)")
    seconds = time.perf_counter() - start
    cpu = None if any(c["cpu_s"] is None for c in TIMELINE) else sum(c["cpu_s"] for c in TIMELINE)
    print(f"quickstart wall time: {seconds:.0f} s" + (f" ({cpu:.0f} CPU-seconds of commands)" if cpu else "")
          + f"; outputs in {out}")
    command = "python experiments/quickstart.py" + (" --basic" if args.basic else "")
    timeline = [{**c, "start": round(c["start"] - start, 1)} for c in sorted(TIMELINE, key=lambda c: c["start"])]
    (out / "quickstart.json").write_text(json.dumps({
        "command": command, "wall_time_s": round(seconds, 1), "seed": args.seed, "jobs": args.jobs, "status": status,
        "cpus": os.cpu_count(), "host": machine, "load_average_start": load, "load_average_end": load_average(),
        "command_cpu_s_total": None if cpu is None else round(cpu, 1), "commands": timeline,
    }, indent=1))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
