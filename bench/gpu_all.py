"""Every pending GPU benchmark of ``bench/`` in one command, one process tree, one time budget (default 12 min).

GPU time comes in windows of about 15 minutes. This runs each GPU benchmark as a child process (its own process
group: a benchmark that overruns is killed with everything it started), one after the other, cheapest first, never
starting one whose budget no longer fits; a failing one is reported and the others go on. It writes

    <out>/<bench>/...                 what each benchmark writes (its JSON result, images, ...)
    <out>/<bench>.log                 its stdout + stderr
    <out>/gpu_all.json                per benchmark: status (ok / failed / timeout / not run), seconds, command, result
    <out>/benchmarks_rows.md          the rows for docs/benchmarks.md: | date | device | command | result |

and exits 0 only when every benchmark ran and succeeded.

    python bench/gpu_all.py                          # all GPU benchmarks, 720 s budget, into ./gpu-bench/
    python bench/gpu_all.py --only extract,train_tip # a second window for what did not fit
    python bench/gpu_all.py --list                   # what would run, with budgets
    python bench/gpu_all.py --smoke                  # every benchmark's CPU --smoke mode (the tests run this)

**A benchmark declares itself** with module-level literals (read with ``ast``, the script is not imported):

    GPU_COMMAND = ["--out", "{out}/bench.json"]      # arguments of the full GPU run ({out}: its own folder)
    GPU_BUDGET_S = 240                               # expected wall seconds on one H200 (scheduling + timeout)
    GPU_RESULT = "{out}/bench.json"                  # optional: where its JSON lands (default as shown)
    SMOKE_COMMAND = ["--smoke", "--out", "{out}/bench.json"]   # optional: the CPU smoke run (default as shown)
    SMOKE_BUDGET_S = 120                             # optional: its budget (default 120)

A benchmark is killed (its whole process group) after 1.5 x its budget + 5 s, or when the total budget runs out.
A JSON result with a top-level ``"summary"`` string gives the row's result text; otherwise the row lists its first
numeric figures.

**The GPU machine has torch but not open_clip, Hydra or wandb.** Carry pure-Python wheels with the checkout and
put them on the path with ``--site``::

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \\
        -d .whl open_clip_torch ftfy regex timm huggingface_hub safetensors tokenizers transformers lightning \\
        lightning-utilities torchmetrics rich filelock wcwidth omegaconf hydra-core antlr4-python3-runtime
    # on the GPU machine:
    pip install --no-index --target /tmp/site .whl/*.whl && python bench/gpu_all.py --site /tmp/site

A benchmark that stops on a missing module is reported as ``failed: missing module <name>`` (carry that wheel).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_RESULT = "{out}/bench.json"
DEFAULT_SMOKE = ["--smoke", "--out", DEFAULT_RESULT]
SMOKE_BUDGET_S = 120


def declared(path: Path) -> dict | None:
    """The GPU declaration of ``bench/<name>.py`` (module-level literals), or None when it declares none."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    except (OSError, SyntaxError):
        return None
    found = {}
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name) and t.id in ("GPU_COMMAND", "GPU_BUDGET_S", "GPU_RESULT",
                                                        "SMOKE_COMMAND", "SMOKE_BUDGET_S") and node.value is not None:
                    try:
                        found[t.id] = ast.literal_eval(node.value)
                    except ValueError:
                        raise SystemExit(f"error: {path}: {t.id} must be a literal") from None
    if "GPU_COMMAND" not in found:
        return None
    cmd, budget = found["GPU_COMMAND"], found.get("GPU_BUDGET_S")
    if not (isinstance(cmd, list) and all(isinstance(a, str) for a in cmd)):
        raise SystemExit(f"error: {path}: GPU_COMMAND must be a list of strings")
    if not isinstance(budget, (int, float)) or budget <= 0:
        raise SystemExit(f"error: {path}: GPU_BUDGET_S (expected seconds on one H200) must be a positive number")
    return {"name": path.stem, "path": str(path), "command": cmd, "budget_s": float(budget),
            "result": found.get("GPU_RESULT", DEFAULT_RESULT), "smoke": found.get("SMOKE_COMMAND", DEFAULT_SMOKE),
            "smoke_budget_s": float(found.get("SMOKE_BUDGET_S", SMOKE_BUDGET_S))}


def discover(bench_dir: Path = HERE) -> list[dict]:
    """Every ``*.py`` in ``bench_dir`` that declares ``GPU_COMMAND``, cheapest first (then by name)."""
    out = [d for p in sorted(bench_dir.glob("*.py")) if p.name != Path(__file__).name and (d := declared(p))]
    return sorted(out, key=lambda d: (d["budget_s"], d["name"]))


def device_name() -> str:
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            names = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                   text=True, timeout=20).stdout.split("\n")
            names = [n.strip() for n in names if n.strip()]
            if names:
                return f"{names[0]}" + (f" (x{len(names)} visible)" if len(names) > 1 else "")
        except (OSError, subprocess.SubprocessError):
            pass
    return f"CPU only ({os.cpu_count()} cores)"


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


_SKIP_KEYS = {"command", "date", "host", "python", "argv", "config", "sizes", "args", "seed", "seeds", "smoke"}
_FIGURE = re.compile(r"(per_s|_s$|_ms$|ratio|speedup|acc|bytes|meets|ok$|passed)")


def _leaves(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k not in _SKIP_KEYS and not k.endswith("_all"):
                yield from _leaves(v, f"{prefix}{k}.")
    elif isinstance(obj, (bool, int, float)) and obj is not None:
        yield prefix[:-1], obj


def _figures(obj, limit: int = 8) -> list[str]:
    """The figures of a JSON result, ``path=value``: timings, rates, ratios and target verdicts first."""
    leaves = list(_leaves(obj))
    ranked = [kv for kv in leaves if _FIGURE.search(kv[0].rsplit(".", 1)[-1])] or leaves
    return [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in ranked[:limit]]


def summary(result: dict | None) -> str:
    if not result:
        return "no JSON result"
    if isinstance(result.get("summary"), str):
        return result["summary"]
    return ", ".join(_figures(result)) or "no numeric figures"


def run_one(bench: dict, out_root: Path, remaining: float, smoke: bool, env: dict) -> dict:
    name = bench["name"]
    folder = out_root / name
    folder.mkdir(parents=True, exist_ok=True)
    args = [a.replace("{out}", str(folder)) for a in (bench["smoke"] if smoke else bench["command"])]
    cmd = [sys.executable, bench["path"], *args]
    shown = "python bench/" + Path(bench["path"]).name + (" " + shlex.join(
        [a.replace("{out}", "OUT") for a in (bench["smoke"] if smoke else bench["command"])]) if args else "")
    budget = bench["smoke_budget_s"] if smoke else bench["budget_s"]
    row = {"name": name, "command": shown, "budget_s": budget}
    if remaining < budget:
        return {**row, "status": "not run", "seconds": 0.0,
                "reason": f"{remaining:.0f} s left < budget {budget:.0f} s: run it in the next window "
                          f"(--only {name})"}
    timeout = min(remaining, budget * 1.5 + 5)
    t0 = time.monotonic()
    log_path = out_root / f"{name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: killed as a whole
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            code = None
        except BaseException:
            _kill_group(proc)
            raise
    seconds = round(time.monotonic() - t0, 1)
    row["seconds"] = seconds
    tail = log_path.read_text(errors="replace").strip().splitlines()[-40:]
    if code is None:
        return {**row, "status": "timeout", "reason": f"killed after {timeout:.0f} s (budget {budget:.0f} s)"}
    if code != 0:
        missing = next((m.group(1) for ln in tail if (m := re.search(r"No module named '([^']+)'", ln))), None)
        reason = (f"missing module {missing} (carry its wheel: see the header of bench/gpu_all.py)" if missing
                  else f"exit code {code}: {tail[-1] if tail else 'no output'}")
        return {**row, "status": "failed", "reason": reason}
    result_path = Path(bench["result"].replace("{out}", str(folder)))
    try:
        result = json.loads(result_path.read_text())
    except (OSError, ValueError):
        result = None
    return {**row, "status": "ok", "result_file": str(result_path), "summary": summary(result)}


def markdown(rows: list[dict], device: str, date: str) -> str:
    lines = [f"<!-- bench/gpu_all.py on {device}, {date} -->"]
    for r in rows:
        text = r.get("summary") if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"
        lines += ["", f"### {r['name']}", "", "| date | device | command | result |", "|---|---|---|---|",
                  f"| {date} | {device} | `{r['command']}` | {text} ({r.get('seconds', 0):.0f} s) |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu-bench", help="output folder (default ./gpu-bench)")
    p.add_argument("--budget", type=float, default=None,
                   help="total seconds for all benchmarks (default 720; --smoke: 600)")
    p.add_argument("--only", default=None, help="comma-separated benchmark names")
    p.add_argument("--smoke", action="store_true", help="each benchmark's CPU smoke mode")
    p.add_argument("--list", action="store_true", help="list the GPU benchmarks and exit")
    p.add_argument("--site", action="append", default=[], help="extra folder for PYTHONPATH (carried wheels)")
    p.add_argument("--bench-dir", default=str(HERE), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    benches = discover(Path(args.bench_dir))
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(names) - {b["name"] for b in benches})
        if unknown:
            print(f"error: --only {','.join(unknown)}: not a GPU benchmark; choices: "
                  f"{', '.join(b['name'] for b in benches)}", file=sys.stderr)
            return 2
        benches = [b for b in benches if b["name"] in names]
    if args.smoke:
        benches.sort(key=lambda d: (d["smoke_budget_s"], d["name"]))
    if args.list:
        for b in benches:
            print(f"{b['name']:<20} {b['budget_s']:>6.0f} s  python bench/{Path(b['path']).name} "
                  f"{shlex.join(b['command'])}")
        print(f"total {sum(b['budget_s'] for b in benches):.0f} s")
        return 0
    budget = args.budget if args.budget is not None else (600.0 if args.smoke else 720.0)
    out_root = Path(args.out).resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *args.site, *filter(None, [env.get("PYTHONPATH")])])
    device = "CPU smoke" if args.smoke else device_name()
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    started = time.monotonic()
    deadline = started + budget
    rows = []
    for b in benches:
        row = run_one(b, out_root, deadline - time.monotonic(), args.smoke, env)
        rows.append(row)
        print(f"{row['name']:<20} {row['status']:<8} {row.get('seconds', 0):>6.1f} s  "
              f"{row.get('summary') or row.get('reason', '')}", flush=True)
    record = {"device": device, "date": date, "smoke": args.smoke, "budget_s": budget, "benchmarks": rows,
              "seconds": round(time.monotonic() - started, 1)}
    (out_root / "gpu_all.json").write_text(json.dumps(record, indent=1))
    (out_root / "benchmarks_rows.md").write_text(markdown(rows, device, date))
    print(f"rows for docs/benchmarks.md: {out_root / 'benchmarks_rows.md'}")
    return 0 if rows and all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
