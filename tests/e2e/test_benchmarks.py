"""The benchmark scripts run (a smoke run on the tiny model; timings are not asserted)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from benchmarks.gpu import suite
from packaging.requirements import Requirement

from ovis_server.catalogue.registry import BUILT_IN
from ovis_server.engine.random_full import build_full_size_pipeline

from .bodies import OVIS_ID

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The GPU run's dry run (benchmarks/gpu/run.sh --dry-run: every part on the CPU with
    the tiny model), once for the module: its report and logs, in the folder returned. Its
    startup, engine, serve and memory steps run those scripts as their own tests would, so
    these tests read the steps' output instead of running the scripts again."""
    out = tmp_path_factory.mktemp("gpu-dry-run") / "out"
    subprocess.run(
        ["benchmarks/gpu/run.sh", str(out), "--dry-run", "--budget", "1200"],
        cwd=ROOT, env={**os.environ, "PYTHON": sys.executable}, capture_output=True,
        text=True, timeout=1500, check=True,
    )  # fmt: skip
    return out


def step_stdout(out: Path, part: str, model_id: str) -> str:
    """What the dry run's step of ``part`` for ``model_id`` printed, from its logs."""
    name = f"logs/{part}-{model_id.replace('/', '_')}.out"
    with tarfile.open(out / "logs.tar.gz") as archive:
        member = archive.extractfile(name)
        assert member is not None, name
        return member.read().decode()


def test_engine_benchmark_prints_its_table(dry_run: Path) -> None:
    # The dry run's engine step: --size square --steps 1 --concurrency 2 on the CPU.
    stdout = step_stdout(dry_run, "engine", OVIS_ID)
    lines = stdout.splitlines()
    assert "| variant | s / image | images / min | peak memory | MFU | vs stock |" in lines
    rows = [line for line in lines if line.startswith("| ") and "variant" not in line]
    assert [row.split(" | ")[0] for row in rows] == [
        "| stock OvisImagePipeline",
        "| engine",
        "| engine, batch of 2",
    ]
    assert rows[0].endswith("| 1.00x |")
    assert "512x512, 1 steps" in stdout  # the preset, resolved


def test_serve_benchmark_alternates_rounds_and_prints_the_median_ratio(dry_run: Path) -> None:
    # The dry run's serve step: --size 64x64 --steps 1 --requests 2 --rounds 2
    # --concurrency 2,1 --poll 0.1 on the CPU; the 2-client case comes first.
    stdout = step_stdout(dry_run, "serve", OVIS_ID)
    printed = stdout.splitlines()
    # The 2-client case's section: up to the 1-client case's heading.
    lines = printed[: printed.index("## 64x64, 1 client: rounds of 2 images, engine batches of 1")]
    assert "## 64x64, 2 clients: rounds of 2 images, engine batches of 1" in lines
    # Each round: the engine alone, then HTTP, on the same number of images.
    start = lines.index(
        "| round | engine alone | HTTP | engine images / min | HTTP images / min | ratio |"
    )
    rounds = lines[start + 2 : start + 4]
    assert [row.split(" | ")[0] for row in rounds] == ["| 1", "| 2"]
    ratios = [float(row.split(" | ")[-1].rstrip(" |")) for row in rounds]
    assert "| run | images | images / min | latency p50 | latency p95 | latency max |" in lines
    rows = [line for line in lines if line.startswith("| HTTP") or line.startswith("| engine")]
    assert [row.split(" | ")[:2] for row in rows[:2]] == [
        ["| HTTP, 2 clients, polling", "4"],
        ["| engine alone, batches of 1", "4"],
    ]
    # CPU per image of each process: on Linux, the server's processes are found.
    processes = [row.split(" | ")[1] for row in rows[2:]]
    assert processes == ["clients (this process)", "API process", "worker processes",
                         "engine (this process)"]  # fmt: skip
    assert all(re.search(r"\| \d+ ms \|$", row) for row in rows[2:])
    assert re.search(r"^worker CPU per image beyond the engine alone: -?\d+ ms; of it, .*"
                     r"PNG encode \d+ ms$", stdout, re.MULTILINE)  # fmt: skip
    assert "aidc-ai/ovis-image (tiny), 1 steps" in stdout
    # The summary, a line a case at the end: the median of the rounds' ratios, with their
    # range.
    match = re.fullmatch(
        r"end-to-end / engine, 64x64, 2 clients: median (\d+\.\d\d) "
        r"\(range (\d+\.\d\d) to (\d+\.\d\d) over 2 rounds\)",
        printed[-2],
    )
    assert match is not None
    assert float(match[2]) == min(ratios)
    assert float(match[3]) == max(ratios)
    assert abs(float(match[1]) - (ratios[0] + ratios[1]) / 2) <= 0.01


def test_serve_benchmark_budget_leaves_later_cases_out() -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/serve.py", "--model", "tiny", "--size", "64x64,128x64",
         "--steps", "1", "--rounds", "1", "--concurrency", "1", "--device", "cpu",
         "--budget", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    assert lines[-2:] == [
        "end-to-end / engine, 64x64, 1 client(s): not run: the 0 s budget was spent",
        "end-to-end / engine, 128x64, 1 client(s): not run: the 0 s budget was spent",
    ]


def test_worker_loop_benchmark_prints_its_table() -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/worker_loop.py", "--model", "tiny", "--size", "64x64",
         "--steps", "1", "--jobs", "3", "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    assert "| jobs | batch | wall | engine busy | busy share | images / min |" in lines
    assert re.fullmatch(r"\| 3 \| 1 \| [\d.]+ s \| [\d.]+ s \| [\d.]+% \| [\d.]+ \|", lines[-3])
    # 3 jobs of 1 step: a progress write each, timed on the progress thread.
    assert re.fullmatch(r"step progress: 3 writes, mean [\d.]+ ms, p95 [\d.]+ ms, .*", lines[-1])


def test_worker_start_benchmark_compares_with_a_baseline_checkout(tiny_weights: Path) -> None:
    # This checkout's src as its own baseline: one round, the table and the ratio line. The
    # run's tiny checkpoint: the script's own (--model tiny) would cost a process of its own.
    result = subprocess.run(
        [sys.executable, "benchmarks/worker_start.py", "--rounds", "1", "--baseline", "src",
         "--model", str(tiny_weights)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    start = lines.index("| measure | baseline (median) | range | this checkout (median) | range |")
    rows = lines[start + 2 : start + 7]
    assert [row.split(" | ")[0] for row in rows] == [
        "| worker CPU, start to ready",
        "| worker CPU in garbage collection, start to ready",
        "| serve, start to ready (wall)",
        "| worker CPU, stop to exit",
        "| serve CPU, stop to exit",
    ]
    assert all(re.fullmatch(r"\|[^|]+(\| \d+\.\d\d s \| [\d.]+-[\d.]+ s ){2}\|", row)
               for row in rows), rows  # fmt: skip
    assert re.fullmatch(r"worker CPU, start to ready, this checkout / baseline: median \d+\.\d\d "
                        r"\(rounds: \d+\.\d\d\)", lines[-1])  # fmt: skip


def test_random_full_has_the_real_sizes() -> None:
    pipeline = build_full_size_pipeline("meta", torch.bfloat16)
    billions = {
        name: sum(p.numel() for p in getattr(pipeline, name).parameters()) / 1e9
        for name in ("transformer", "text_encoder", "vae")
    }
    assert 7.3 < billions["transformer"] < 7.45
    assert 1.6 < billions["text_encoder"] < 1.8
    assert billions["vae"] < 0.1
    assert pipeline.vae_scale_factor == 8


def test_flop_count_matches_the_design_document() -> None:
    from benchmarks.flops import image_flops, transformer_forward_flops

    transformer = build_full_size_pipeline("meta", torch.bfloat16).transformer
    assert abs(transformer_forward_flops(transformer, 4096, 256) / 1e12 - 51) < 0.5
    assert abs(image_flops(transformer, 1024, 1024, 28, guidance=True) / 1e15 - 2.86) < 0.02


def test_queue_benchmark_prints_its_table() -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/queue.py", "--jobs", "40", "--workers", "4",
         "--requests", "40", "--clients", "8"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    assert "| store | claims / s | submits / s | status p50 | status p99 |" in result.stdout
    assert "| SQLite (WAL) |" in result.stdout


def test_metrics_benchmark_prints_its_table() -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/metrics.py", "--postgres-url", "", "--jobs", "2000",
         "--recent", "50", "--queued", "10", "--scrapes", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    assert lines[0].startswith("| store | finished jobs kept | finished last minute |")
    assert lines[2].startswith("| SQLite | 2,000 | 50 |")


def test_memory_benchmark_prints_its_tables(dry_run: Path) -> None:
    # The dry run's memory step: every profile, --caps 24,8, on the CPU.
    stdout = step_stdout(dry_run, "memory", OVIS_ID)
    lines = stdout.splitlines()
    start = lines.index(
        "| profile | s / image | time vs full | peak GPU memory | planned peak | note |"
    )
    profiles = [line.split(" | ")[0] for line in lines[start + 2 : start + 7]]
    assert profiles == ["| full", "| text-encoder-offload", "| 8bit", "| group-offload-block",
                        "| group-offload-leaf"]  # fmt: skip
    assert lines[start + 2].split(" | ")[2] == "1.00x"
    assert "| auto, --gpu-memory 24GiB | full |" in stdout  # on a CPU auto is full
    assert "| 24 GiB | full | 19.5 GiB | 2 |" in lines
    assert "| 8 GiB | group-offload-block | 2.6 GiB | 2 |" in lines


def test_cancel_load_benchmark_prints_its_table() -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/cancel_load.py", "--cancels", "10", "--rounds", "1",
         "--pollers", "2", "--idle-seconds", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    assert "| requests | count | p50 ms | p99 ms | max ms |" in lines
    assert any(line.startswith("| cancel of a running job (token A) | 10 |") for line in lines)


def test_status_benchmark_prints_its_ratio() -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/status.py", "--clients", "4", "--calls", "40",
         "--rounds", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    assert "| target | median calls / s | range | median p50 ms |" in lines
    assert sum(line.startswith("| 2 | ") for line in lines) == 2  # round 2: both targets
    ratio = [line for line in lines if line.startswith("status / bare: ")]
    assert len(ratio) == 1
    assert float(ratio[0].split(": ")[1]) > 0


def test_startup_benchmark_prints_its_tables(dry_run: Path) -> None:
    # The dry run's startup step: --device cpu --compile off --warmup off --sizes square
    # --steps 1 on the tiny model.
    stdout = step_stdout(dry_run, "startup", OVIS_ID)
    rows = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows] == [
        "| start", "| cold cache", "| warm cache", "| size", "| square"
    ]  # fmt: skip
    # The worker's own times come from its log: a changed log line would show as "?".
    assert "?" not in rows[1]
    assert rows[1].endswith("| off | - | - |")
    assert re.search(r"first / second, worst: \d+\.\d\d$", stdout)


# --- the GPU run (benchmarks/gpu) -----------------------------------------------------------


def test_gpu_run_dry_run_writes_the_whole_report(dry_run: Path) -> None:
    """run.sh --dry-run: every part on the CPU with the tiny model, one report."""
    out = dry_run
    report = (out / "report.md").read_text()
    lines = report.splitlines()
    start = lines.index("| part | model | status | seconds | note |") + 2
    table = lines[start : lines.index("", start)]
    statuses = {
        (row.split(" | ")[0][2:], row.split(" | ")[1]): row.split(" | ")[2] for row in table
    }
    models = [spec.model_id for spec in BUILT_IN]
    expected = {("environment", "-"): "ok"}
    for model in models:
        expected |= {(part, model): "ok" for part in ("startup", "engine", "serve", "memory")}
        expected |= {(part, model): "not run" for part in ("engine-fp8", "serve-fp8")}
    assert statuses == expected, report
    assert "| torch | " in report
    assert "| stock OvisImagePipeline |" in report
    assert "| cold cache |" in report
    assert "| warm cache |" in report
    assert re.search(r"end-to-end / engine, 64x64, 2 clients: median \d+\.\d\d", report)
    assert re.search(r"end-to-end / engine, 64x64, 1 client: median \d+\.\d\d", report)
    assert "| auto, --gpu-memory 8GiB | full |" in report
    with tarfile.open(out / "logs.tar.gz") as archive:
        names = archive.getnames()
    assert f"logs/serve-{models[0].replace('/', '_')}.err" in names


def test_gpu_run_records_a_failed_and_a_stopped_step(tmp_path: Path) -> None:
    """A step that fails or runs out of time is reported with what it printed and its
    traceback's tail, and the run goes on."""
    failing = suite.Step(
        "engine", "acme/model",
        [sys.executable, "-c", "print('| partial row |'); raise RuntimeError('CUDA broke')"],
        budget=60,
    )  # fmt: skip
    hanging = suite.Step(
        "serve", "acme/model",
        [sys.executable, "-c", "import time; print('| first case |', flush=True); time.sleep(600)"],
        budget=60,
    )  # fmt: skip
    failed = suite.run_step(failing, 60, tmp_path)
    stopped = suite.run_step(hanging, 3, tmp_path)
    assert failed.status == "failed"
    assert failed.note == "exit code 1"
    assert "RuntimeError: CUDA broke" in failed.stderr_tail
    assert stopped.status == "timed out"
    assert stopped.seconds < 30
    assert stopped.stdout == "| first case |\n"
    parts = [suite.Part("engine", "Engine", [failing]), suite.Part("serve", "Serving", [hanging])]
    report = suite.Report(tmp_path / "report.md", ["# run"], parts)
    report.add(failed)
    report.add(stopped)
    text = (tmp_path / "report.md").read_text()
    assert "| engine | acme/model | failed |" in text
    assert "| serve | acme/model | timed out |" in text
    assert "| partial row |" in text
    assert "RuntimeError: CUDA broke" in text


def test_gpu_run_measures_every_built_in_model(tmp_path: Path) -> None:
    """Each part runs once per model of the catalogue's registry, by its --model-id, at the
    issue's settings on the GPU."""
    parts = {part.name: part for part in suite.plan(False, tmp_path)}
    assert list(parts) == ["environment", "startup", "engine", "serve", "memory",
                           "engine-fp8", "serve-fp8"]  # fmt: skip
    models = [spec.model_id for spec in BUILT_IN]
    for name, part in parts.items():
        if name == "environment":
            continue
        assert [step.model_id for step in part.steps] == models
        for step in part.steps:
            assert step.argv[step.argv.index("--model-id") + 1] == step.model_id
    serve = parts["serve"].steps[0].argv
    assert serve[serve.index("--size") + 1] == "square_hd,landscape_16_9"
    assert serve[serve.index("--concurrency") + 1] == "4,1"
    assert "--fp8" in parts["engine-fp8"].steps[0].argv
    assert sum(step.budget for step in parts["engine"].steps) <= suite.GPU_BUDGET_SECONDS


# --- the wheel bundle (scripts/gpu_wheels.py) -----------------------------------------------


def load_script(name: str) -> ModuleType:
    """A script of scripts/ as a module (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


gpu_wheels = load_script("gpu_wheels")


def test_wheel_bundle_lists_what_the_gpu_image_lacks() -> None:
    needed = gpu_wheels.closure("ovis-server", {"fp8"})
    plan = gpu_wheels.bundle_plan(needed)
    for name in ("diffusers", "fastapi", "uvicorn", "sqlalchemy", "alembic", "pydantic",
                 "torchao", "standardwebhooks"):  # fmt: skip
        assert plan[name] == "not in the GPU image"
    # The image's huggingface-hub (1.33) is older than ours needs; what uses it comes too.
    assert plan["huggingface-hub"].startswith("the image has 1.33.0")
    assert "huggingface-hub" in plan["transformers"]
    for name in ("torch", "numpy", "pillow", "tqdm", "click", "httpx", "ovis-server"):
        assert name not in plan
    assert all(pin.count("==") == 1 for pin in gpu_wheels.pins(needed, plan))


def test_wheel_bundle_rules_on_made_up_packages() -> None:
    def needed(name: str, *requires: str) -> Any:
        return gpu_wheels.Needed(name, "1.0", tuple(Requirement(r) for r in requires))

    packages = {
        "ovis-server": needed("ovis-server", "lib>=2", "fresh", "old>=3", "fine>=1"),
        "lib": needed("lib"),
        "fresh": needed("fresh"),
        "old": needed("old"),
        "fine": needed("fine"),
        "user": needed("user", "fresh"),
    }
    image = frozenset({"lib", "old", "fine", "user"})
    plan = gpu_wheels.bundle_plan(packages, image, {"old": "2.0", "fine": "1.5"})
    assert plan == {
        "fresh": "not in the GPU image",
        "old": "the image has 2.0; ovis-server needs old>=3",
        "user": "needs fresh, bundled; its pins on them unknown",
    }


def test_wheel_bundle_installs_offline(tmp_path: Path) -> None:
    """The install step run.sh uses: no index, from the bundle's requirements.txt."""
    bundle = tmp_path / "whl"
    bundle.mkdir()
    wheel = bundle / "benchpkg-1.0-py3-none-any.whl"
    info = "benchpkg-1.0.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("benchpkg/__init__.py", "ANSWER = 42\n")
        archive.writestr(
            f"{info}/METADATA", "Metadata-Version: 2.1\nName: benchpkg\nVersion: 1.0\n"
        )
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\n"
                         "Root-Is-Purelib: true\nTag: py3-none-any\n")  # fmt: skip
        archive.writestr(f"{info}/RECORD", "")
    (bundle / "requirements.txt").write_text("benchpkg==1.0\n")
    target = tmp_path / "site"
    command = gpu_wheels.install_command(bundle, target)
    assert "--no-index" in command
    env = {**os.environ, "PIP_INDEX_URL": "http://127.0.0.1:9/", "PIP_FIND_LINKS": ""}
    subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=True)
    found = subprocess.run(
        [sys.executable, "-c", "import benchpkg; print(benchpkg.ANSWER)"],
        env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    assert found.stdout.strip() == "42"


@pytest.mark.parametrize("path", [".whl/x.whl", ".whl/requirements.txt"])
def test_wheel_bundle_is_ignored_by_git(path: str) -> None:
    ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, check=False)
    assert ignored.returncode == 0


def test_suite_cpu_counts_the_processes_a_test_starts(tmp_path: Path) -> None:
    # A test whose child process burns 2 s of CPU: the table shows the child on a row
    # of its own (a python -m module), with about that, and pytest's exit code comes back.
    (tmp_path / "burn.py").write_text(
        "import time\nstart = time.process_time()\nwhile time.process_time() - start < 2: pass\n"
    )
    (tmp_path / "test_burns.py").write_text(
        "import pathlib, subprocess, sys\n"
        "def test_burns():\n"
        "    here = pathlib.Path(__file__).parent\n"
        "    subprocess.run([sys.executable, '-m', 'burn'], check=True, cwd=here)\n"
        "def test_fails():\n"
        "    assert False\n"
    )
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "suite_cpu.py"), "--interval", "0.1",
         "--", str(tmp_path), "-q", "-p", "no:cacheprovider", "-c", "/dev/null"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr  # test_fails failed
    by_kind, rest = result.stdout.split("## CPU of the processes the tests started")
    by_file, by_test = rest.split("## The 30 tests")
    rows = {
        line.split(" | ")[0][2:]: line.split(" | ")[1:]
        for line in by_kind.splitlines()
        if line.startswith("| ") and not line.startswith("| kind")
    }
    processes, cpu = int(rows["python -m burn"][0]), float(rows["python -m burn"][1])
    assert processes == 1
    assert 1.4 <= cpu <= 2.5
    assert int(rows["pytest"][0]) == 1
    # The child inherited pytest's name for the test that ran it: it counts for its file.
    files = [line for line in by_file.splitlines() if line.startswith("| test_")]
    assert len(files) == 1
    assert files[0].startswith("| test_burns.py | 1 | ")
    assert 1.4 <= float(files[0].split(" | ")[2]) <= 2.5
    tests = [line for line in by_test.splitlines() if line.startswith("| test_")]
    assert [line.split(" | ")[:2] for line in tests] == [["| test_burns.py::test_burns", "1"]]
    assert re.search(
        r"^CPU \d+ s in \d+ s of wall time: [\d.]+ cores busy of \d+", result.stdout, re.M
    )
