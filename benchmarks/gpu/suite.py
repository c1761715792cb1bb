"""The measuring run for a lent GPU: the benchmarks in order of value, each within its own
time budget, into one markdown report.

``benchmarks/gpu/run.sh OUTDIR`` installs the wheel bundle and starts this; it writes
``OUTDIR/report.md`` (rewritten after every step, so a run stopped part-way leaves what it
measured) and, at the end, ``OUTDIR/logs.tar.gz`` (each step's full stdout and stderr).

A part is one benchmark script, run once per built-in model of the catalogue (today
Ovis-Image; each model the registry gains is measured the same way, by its ``--model-id``).
Each run of a script is a process group of its own with a timeout: the smaller of the
part's budget and what is left of the run's ``--budget``. A script that fails or runs out
of time is recorded with the tail of its stderr (the traceback) and the run goes on; a
part that cannot start in the time left is recorded as not run. The scripts print their
tables as they measure, so a stopped script's report still holds its finished rows.

``--dry-run`` runs the same parts on the CPU with the tiny model and tiny sizes and steps;
the parts that need CUDA (FP8) are recorded as not run there.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ovis_server.catalogue.registry import BUILT_IN

ROOT = Path(__file__).resolve().parents[2]
# The GPU run's whole budget: 8 minutes of a 15-minute lease, the rest for starting the
# machine, the transfers and a second command.
GPU_BUDGET_SECONDS = 480.0
DRY_RUN_BUDGET_SECONDS = 300.0
# A part is not started with less than this left (a load of the full model alone takes
# about half of it).
GPU_MINIMUM_SECONDS = 45.0
# After SIGTERM, how long a stopped script and its servers get before SIGKILL.
STOP_GRACE_SECONDS = 20.0
STDERR_TAIL_LINES = 40


@dataclass(frozen=True)
class Step:
    """One script run: a part for one model."""

    part: str
    model_id: str
    argv: list[str]
    budget: float
    env: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        model = self.model_id.replace("/", "_") if self.model_id else "all"
        return f"{self.part}-{model}"


@dataclass(frozen=True)
class Part:
    name: str
    title: str
    steps: list[Step]
    cuda_only: bool = False


@dataclass
class Outcome:
    step: Step
    status: str  # ok, failed, timed out, not run
    seconds: float = 0.0
    stdout: str = ""
    stderr_tail: str = ""
    note: str = ""


def script(name: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "benchmarks" / name), *args]


def plan(dry_run: bool, cache_root: Path) -> list[Part]:
    """Every part, in order of value, for each built-in model."""
    models = [spec.model_id for spec in BUILT_IN]
    python = sys.executable
    environment = Step("environment", "", [python, "-m", "benchmarks.gpu.environment"], 60)
    if dry_run:
        weights = ["--device", "cpu"]

        def startup(model: str) -> list[str]:
            return script("startup.py", "--model", "tiny", "--model-id", model, *weights,
                          "--compile", "off", "--warmup", "off", "--sizes", "square",
                          "--steps", "1")  # fmt: skip

        def engine(model: str, *more: str) -> list[str]:
            # A preset size, as on the GPU, and a batch of 2 besides: tests/e2e/
            # test_benchmarks.py checks this step's table (512x512, one step: cheap here).
            return script("engine.py", "--weights", "tiny", "--model-id", model, *weights,
                          "--size", "square", "--steps", "1", "--repeats", "1", "--warmup", "0",
                          "--concurrency", "2", *more)  # fmt: skip

        def serve(model: str, *more: str) -> list[str]:
            # Two rounds of two images a case: tests/e2e/test_benchmarks.py checks the
            # rounds' table and their median on this step's output.
            return script("serve.py", "--model", "tiny", "--model-id", model, *weights,
                          "--size", "64x64", "--steps", "1", "--requests", "2",
                          "--rounds", "2", "--concurrency", "2,1", "--poll", "0.1",
                          *more)  # fmt: skip

        def memory(model: str) -> list[str]:
            # Every profile, as on the GPU, under two of its caps: tests/e2e/test_benchmarks.py
            # checks this step's tables.
            return script("memory.py", "--weights", "tiny", "--model-id", model, *weights,
                          "--size", "64x64", "--steps", "1", "--repeats", "1", "--warmup", "0",
                          "--caps", "24,8", "--budget", "60")  # fmt: skip

        budgets = {"startup": 200.0, "engine": 90.0, "serve": 120.0, "memory": 90.0}
    else:
        full = ["--device", "cuda"]

        def startup(model: str) -> list[str]:
            return script("startup.py", "--model", "random-full", "--model-id", model, *full,
                          "--sizes", "square_hd,landscape_16_9")  # fmt: skip

        def engine(model: str, *more: str) -> list[str]:
            return script("engine.py", "--weights", "random-full", "--model-id", model, *full,
                          "--size", "square_hd", "--repeats", "3", "--warmup", "1",
                          "--concurrency", "1", *more)  # fmt: skip

        def serve(model: str, *more: str) -> list[str]:
            return script("serve.py", "--model", "random-full", "--model-id", model, *full,
                          "--size", "square_hd,landscape_16_9", "--concurrency", "4,1",
                          "--rounds", "3", "--poll", "0.1", "--budget", "150",
                          *more)  # fmt: skip

        def memory(model: str) -> list[str]:
            return script("memory.py", "--weights", "random-full", "--model-id", model, *full,
                          "--size", "1024x1024", "--steps", "8", "--repeats", "1",
                          "--warmup", "1", "--caps", "24,16,12,8", "--budget", "200")  # fmt: skip

        budgets = {"startup": 240.0, "engine": 150.0, "serve": 240.0, "memory": 260.0}

    def per_model(
        part: str, argv: Callable[[str], list[str]], budget: float, shared_cache: bool
    ) -> list[Step]:
        steps = []
        for model in models:
            # startup.py's cold start fills the model's cache; the parts after it share it.
            cache = cache_root / model.replace("/", "_")
            env = {"TORCHINDUCTOR_CACHE_DIR": str(cache)} if shared_cache else {}
            steps.append(Step(part, model, argv(model), budget, env))
        return steps

    fp8_budget = 120.0 if dry_run else 330.0
    return [
        Part("environment", "Device and versions", [environment]),
        Part("startup", "Start-up: cold and warm compile cache (bf16)",
             per_model("startup", startup, budgets["startup"], True)),
        Part("engine", "Engine: stock pipeline against ours (bf16)",
             per_model("engine", engine, budgets["engine"], True)),
        Part("serve", "Serving: end-to-end against the engine alone (bf16)",
             per_model("serve", serve, budgets["serve"], True)),
        Part("memory", "Memory profiles under caps standing for 24, 16, 12 and 8 GB cards",
             per_model("memory", memory, budgets["memory"], False)),
        Part("engine-fp8", "Engine: stock against ours, bf16 and FP8",
             per_model("engine-fp8", lambda m: engine(m, "--fp8"), fp8_budget, True),
             cuda_only=True),
        Part("serve-fp8", "Serving with FP8",
             per_model("serve-fp8", lambda m: serve(m, "--fp8"), fp8_budget, True),
             cuda_only=True),
    ]  # fmt: skip


def run_step(step: Step, timeout: float, logs: Path) -> Outcome:
    """Run ``step`` as a process group of its own for at most ``timeout`` seconds; its
    stdout and stderr go to ``logs``."""
    out_path, err_path = logs / f"{step.name}.out", logs / f"{step.name}.err"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **step.env}
    started = time.monotonic()
    with out_path.open("wb") as out, err_path.open("wb") as err:
        process = subprocess.Popen(
            step.argv, cwd=ROOT, stdout=out, stderr=err, env=env, start_new_session=True
        )
        try:
            code: int | None = process.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
            stop_group(process)
    seconds = time.monotonic() - started
    stdout = out_path.read_text(errors="replace")
    stderr = err_path.read_text(errors="replace").splitlines()
    tail = "\n".join(stderr[-STDERR_TAIL_LINES:])
    if code is None:
        note = f"stopped after {seconds:.0f} s (its budget: {timeout:.0f} s)"
        return Outcome(step, "timed out", seconds, stdout, tail, note)
    if code != 0:
        return Outcome(step, "failed", seconds, stdout, tail, f"exit code {code}")
    return Outcome(step, "ok", seconds, stdout)


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the step's process group (the script, and the servers it started, which
    stop their workers), then SIGKILL to what is left of it after the grace time."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    while time.monotonic() < deadline:
        process.poll()  # reaps the script itself once it has exited
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break  # the whole group is gone
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def cuda_available() -> bool:
    answer = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
        capture_output=True,
        text=True,
        check=False,
    )
    return answer.stdout.strip() == "True"


class Report:
    """OUTDIR/report.md, rewritten as outcomes come in."""

    def __init__(self, path: Path, header: list[str], parts: list[Part]) -> None:
        self.path = path
        self.header = header
        self.parts = parts
        self.outcomes: dict[str, Outcome] = {}

    def add(self, outcome: Outcome) -> None:
        self.outcomes[outcome.step.name] = outcome
        self.write()

    def write(self) -> None:
        lines = [*self.header, "", "| part | model | status | seconds | note |"]
        lines.append("|---|---|---|---:|---|")
        for part in self.parts:
            for step in part.steps:
                got = self.outcomes.get(step.name)
                status, seconds, note = (
                    (got.status, f"{got.seconds:.0f}", got.note) if got else ("pending", "", "")
                )
                lines.append(
                    f"| {part.name} | {step.model_id or '-'} | {status} | {seconds} | {note} |"
                )
        for part in self.parts:
            lines += ["", f"## {part.title}"]
            for step in part.steps:
                got = self.outcomes.get(step.name)
                if got is None:
                    continue
                lines += ["", f"### {step.model_id or part.name}: {got.status}", ""]
                lines.append(f"`{display(step)}`")
                if got.note:
                    lines += ["", got.note]
                if got.stdout.strip():
                    lines += ["", got.stdout.rstrip()]
                if got.stderr_tail.strip():
                    lines += ["", "stderr, last lines:", "", "```text", got.stderr_tail, "```"]
        self.path.write_text("\n".join(lines) + "\n")


def display(step: Step) -> str:
    """The step's command as one could type it in the repository."""
    argv = [arg.replace(str(ROOT) + "/", "") for arg in step.argv]
    argv[0] = "python"
    env = " ".join(f"{name}=..." for name in step.env)
    return (env + " " if env else "") + shlex.join(argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="the CPU, the tiny model")
    parser.add_argument("--budget", type=float, help="seconds for the whole run")
    parser.add_argument("--parts", help="comma-separated part names (default: all, in order)")
    parser.add_argument("--note", default="", help="a line for the report's header")
    args = parser.parse_args(argv)
    started = time.monotonic()
    budget = args.budget or (DRY_RUN_BUDGET_SECONDS if args.dry_run else GPU_BUDGET_SECONDS)
    minimum = 0.0 if args.dry_run else GPU_MINIMUM_SECONDS
    args.outdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ovis-gpu-run-") as scratch:
        logs = Path(scratch, "logs")
        logs.mkdir()
        parts = plan(args.dry_run, Path(scratch, "compile-cache"))
        if args.parts:
            wanted = [name.strip() for name in args.parts.split(",") if name.strip()]
            unknown = set(wanted) - {part.name for part in parts}
            if unknown:
                parser.error(f"unknown parts {sorted(unknown)}; there are "
                             f"{', '.join(part.name for part in parts)}")  # fmt: skip
            parts = [part for part in parts if part.name in wanted or part.name == "environment"]
        has_cuda = cuda_available()
        header = [
            f"# ovis-server measuring run{' (dry run: CPU, tiny model)' if args.dry_run else ''}",
            "",
            f"Started {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M')} UTC; budget "
            f"{budget:.0f} s; parts: {', '.join(part.name for part in parts)}; models: "
            f"{', '.join(spec.model_id for spec in BUILT_IN)}; CUDA: "
            f"{'yes' if has_cuda else 'no'}.",
        ]
        if args.note:
            header += ["", args.note]
        report = Report(args.outdir / "report.md", header, parts)
        report.write()
        for part in parts:
            for step in part.steps:
                # What a step stopped at its limit takes to end is inside the budget too.
                left = budget - (time.monotonic() - started) - STOP_GRACE_SECONDS
                if part.cuda_only and not has_cuda:
                    report.add(Outcome(step, "not run", note="needs CUDA"))
                elif left < max(minimum, 1.0):
                    report.add(Outcome(step, "not run", note=f"{left:.0f} s of the budget left"))
                else:
                    print(f"{step.name}: up to {min(step.budget, left):.0f} s", flush=True)
                    outcome = run_step(step, min(step.budget, left), logs)
                    print(f"{step.name}: {outcome.status} in {outcome.seconds:.0f} s", flush=True)
                    report.add(outcome)
        with tarfile.open(args.outdir / "logs.tar.gz", "w:gz") as archive:
            archive.add(logs, arcname="logs")
    # The status table last, where a caller that keeps only the end of the output sees it.
    lines = (args.outdir / "report.md").read_text().splitlines()
    first = lines.index("| part | model | status | seconds | note |")
    print("\n".join(lines[first : lines.index("", first)]))
    print(f"report: {args.outdir / 'report.md'} ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
