"""README command 1 against its recorded runs: does this machine print what the README's machines printed?

Every recorded run of the full demo is a generated file ``experiments/results_*.md`` whose first table follows the
caption ``Full demo (...), seed 0:`` and whose stamp names the machine (``machine: ...;``). This script writes the
same table for a demo's output directory (``experiments/readme_results.py --grid``, so both tables come from one
function) and compares it cell by cell with each record: the records it equals digit for digit, else the nearest
and the cells that differ. ``experiments/quickstart.py`` runs it at the end of the default demo (seed 0, the default
defenses, no overrides: what the records ran).

    python experiments/recorded_demos.py OUT          # OUT: a quickstart output directory
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parent
CAPTION = "Full demo ("
MACHINE = re.compile(r"^Generated (\S+) .*?; machine: (.*?); torch ", re.MULTILINE)


def demo_table(text: str) -> dict[str, list[str]] | None:
    """The first table after a seed-0 ``Full demo`` caption in generated Markdown: {defense: its cells}, the header
    under ``"defense"``; None when the text has no such table."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(CAPTION) and line.endswith("seed 0:")), None)
    if start is None:
        return None
    table: dict[str, list[str]] = {}
    for line in lines[start + 1:]:
        if not line.startswith("|"):
            if table:
                break
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if set(cells[0]) <= set("-"):
            continue  # the |---| line
        table[cells[0]] = cells[1:]
    return table or None


def machine(text: str) -> str:
    """``machine, date`` from the generated stamp."""
    found = MACHINE.search(text)
    return f"{found.group(2)}, {found.group(1)}" if found else "machine not stated"


def records(root: Path = EXPERIMENTS) -> list[dict]:
    """Each recorded full demo of seed 0 under ``root``: its file, machine and table, by file name."""
    found = []
    for path in sorted(root.glob("results_*.md")):
        text = path.read_text()
        table = demo_table(text)
        if table:
            found.append({"file": path, "machine": machine(text), "table": table})
    return found


def differences(mine: dict[str, list[str]], theirs: dict[str, list[str]]) -> list[str]:
    """The cells where two demo tables differ, as ``defense column: mine here, theirs there``; a defense in one
    table only is one difference."""
    header = mine.get("defense") or theirs.get("defense") or []
    out = []
    for defense in [d for d in mine if d != "defense"] + [d for d in theirs if d not in mine]:
        if defense not in mine or defense not in theirs:
            out.append(f"{defense}: {'not in the record' if defense in mine else 'not run here'}")
            continue
        for name, a, b in zip(header, mine[defense], theirs[defense]):
            if a != b:
                out.append(f"{defense} {name.split(' (')[0]}: {a} here, {b} there")
    return out


def compare(mine: dict[str, list[str]], recorded: list[dict]) -> dict:
    """``equal``: the records this table equals cell for cell; ``nearest``: otherwise the record with the fewest
    differing cells (the first by file name on a tie) and those cells."""
    scored = [(len(differences(mine, r["table"])), i, r) for i, r in enumerate(recorded)]
    equal = [r for n, _, r in scored if n == 0]
    if equal or not scored:
        return {"equal": equal, "nearest": None, "differences": []}
    _, _, nearest = min(scored, key=lambda s: s[:2])
    return {"equal": [], "nearest": nearest, "differences": differences(mine, nearest["table"])}


def cells(n: int) -> str:
    return "1 cell differs" if n == 1 else f"{n} cells differ"


def verdict_text(result: dict, count: int) -> str:
    name = lambda r: f"{r['file'].name} ({r['machine']})"  # noqa: E731
    if result["equal"]:
        return (f"recorded runs of this demo ({count} in experiments/results_*.md): the same table digit for digit as "
                + "; ".join(name(r) for r in result["equal"]))
    if result["nearest"] is None:
        return "recorded runs of this demo: none found in experiments/results_*.md"
    return (f"recorded runs of this demo ({count} in experiments/results_*.md): none printed this table. Nearest: "
            f"{name(result['nearest'])}, {cells(len(result['differences']))}: "
            + "; ".join(result["differences"])
            + ". The numbers follow the processor's kernel path and thread count (README, Reproducibility).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="a quickstart output directory (defend/, grid/, benign/)")
    parser.add_argument("--json", type=Path, help="also write the comparison here")
    parser.add_argument("--records", type=Path, default=EXPERIMENTS,
                        help="the directory of the recorded runs' results_*.md (default: experiments/)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    table_file = out / "report" / "demo_table.md"
    made = subprocess.run([sys.executable, str(EXPERIMENTS / "readme_results.py"), "--grid", str(out / "defend"),
                           str(out / "grid"), str(out / "benign"), "--out", str(table_file)],
                          capture_output=True, text=True)
    mine = demo_table(table_file.read_text()) if made.returncode == 0 and table_file.exists() else None
    if mine is None:
        print(f"error: no seed-0 demo table from {out} (experiments/readme_results.py --grid):\n{made.stderr[-2000:]}",
              file=sys.stderr)
        return 1
    recorded = records(args.records)
    result = compare(mine, recorded)
    print(verdict_text(result, len(recorded)))
    if args.json:
        args.json.write_text(json.dumps({
            "table": mine, "equal": [str(r["file"]) for r in result["equal"]],
            "nearest": str(result["nearest"]["file"]) if result["nearest"] else None,
            "differences": result["differences"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
