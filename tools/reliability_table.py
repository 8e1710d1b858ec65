"""Regenerate the fault / bad-input table of docs/RELIABILITY.md from the tests that try them.

Runs the reliability test files with BONSAI_RELIABILITY_LOG set (tests/conftest.py then logs, per
test, its outcome, its docstring and the messages a user would see), writes
docs/results/reliability.json (with hardware, commit and settings) and rewrites the table between
the markers in docs/RELIABILITY.md. Prints the JSON summary.

    python tools/reliability_table.py            # run the tests, write JSON and table
    python tools/reliability_table.py --no-run   # table from the existing JSON only
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "docs" / "results" / "reliability.json"
DOC = ROOT / "docs" / "RELIABILITY.md"
BEGIN, END = "<!-- reliability-table:begin (tools/reliability_table.py) -->", "<!-- reliability-table:end -->"
FILES = ["tests/integration/test_bad_inputs.py", "tests/integration/test_resume.py",
         "tests/integration/test_adapt_safety.py", "tests/integration/test_checks_first.py",
         "tests/integration/test_layer_types_rope.py", "tests/integration/test_reader_fuzz.py"]
TMP = re.compile(r"/tmp/pytest-of-[^/\s]+/pytest-\d+/[^/\s'\";,)]+")


def commit() -> str:
    def git(*a):
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "bonsai_lite", "tests", "tools")
    return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")


def hardware() -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"machine": platform.machine(), "cores": cores, "python": platform.python_version(),
            "os": platform.platform()}


def run_tests(files: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        log = Path(d) / "log.jsonl"
        env = {**os.environ, "BONSAI_RELIABILITY_LOG": str(log), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files], cwd=ROOT, env=env,
                       check=False)
        return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def _cell(text: str) -> str:
    return TMP.sub("TMP", text).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict]) -> str:
    out = []
    for file in dict.fromkeys(r["test"].split("::")[0] for r in rows):
        out += ["", f"**{file}**", "", "| fault / input | observed outcome | test |", "| --- | --- | --- |"]
        for r in (r for r in rows if r["test"].startswith(file + "::")):
            name = r["test"].split("::", 1)[1]
            human = re.sub(r"^test_", "", name.split("[")[0]).replace("_", " ")
            param = name[len(name.split("[")[0]):]
            fault = (r["doc"] or human) + (f" `{param[1:-1]}`" if param else "")
            seen = "<br>".join(f"`{_cell(o)}`" for o in dict.fromkeys(r["observed"])) or "as the test asserts"
            status = "" if r["outcome"] == "passed" else f" **{r['outcome'].upper()} ({r['when']})**"
            out.append(f"| {_cell(fault)} | {seen}{status} | `{name}` |")
    return "\n".join(out).strip()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-run", action="store_true", help="rebuild the table from docs/results/reliability.json")
    args = p.parse_args()
    if args.no_run:
        result = json.loads(RESULT.read_text())
    else:
        t0 = time.time()
        rows = run_tests(FILES)
        result = {"tool": "tools/reliability_table.py", "commit": commit(), "hardware": hardware(),
                  "settings": {"files": FILES, "threads": 1}, "seconds": round(time.time() - t0, 1),
                  "summary": {k: sum(r["outcome"] == k for r in rows) for k in ("passed", "failed", "skipped")},
                  "rows": [{**r, "observed": [TMP.sub("TMP", o) for o in r["observed"]]} for r in rows]}
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(json.dumps(result, indent=1) + "\n")
    doc = DOC.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{DOC}: markers {BEGIN!r} / {END!r} not found")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{table(result['rows'])}\n{END}{tail}")
    print(json.dumps({k: result[k] for k in ("commit", "hardware", "settings", "seconds", "summary")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
