"""The wheel bundle that the lent GPU machine lacks, and its offline install.

The GPU machine (see the device notes: one H100 or H200, no network) runs Python 3.12 with
torch and a list of other packages already installed. ovis-server[fp8] needs more: this
builds the rest into ``.whl/`` (ignored by git), small enough to travel with the checkout,
and installs it there without a network.

    python scripts/gpu_wheels.py plan                 # what would be bundled, and why
    python scripts/gpu_wheels.py build [--dir .whl]   # download them (here: PyPI needed)
    python scripts/gpu_wheels.py check [--dir .whl]   # the offline install, as a dry run
    python scripts/gpu_wheels.py install DIR TARGET   # the offline install (run.sh does it)

What is bundled: every package of ovis-server[fp8]'s requirements, as installed in the
environment running this script (the versions its tests pass with; markers evaluated for
Linux x86_64, CPython 3.12), less torch and what torch needs, less what the GPU image has
(``IMAGE_PACKAGES``, by name); except that an image package is bundled after all where
its version there is known (``IMAGE_VERSIONS``) and a requirement of ours rules it out,
or where it needs a package that is bundled (its own pin on that one is not known here).
ovis-server itself is not bundled: run.sh puts the checkout's ``src/`` on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The 'cuda' image of the GPU machines, by name, as the device notes list it (2026-11-17).
IMAGE_PACKAGES = frozenset(
    """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
    botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
    coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
    diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
    frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
    hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
    jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
    linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl
    meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
    narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti
    nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile
    nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
    nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime
    onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
    orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
    prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
    pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
    pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich
    sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
    sentencepiece sentence-transformers setuptools shellingham simplejson six
    sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
    tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
    torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
    typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt
    xarray xxhash yarl zipp
    """.split()  # noqa: SIM905 - the notes' list, pasted as it is
)
# Versions there that a session saw (the device notes' pip list, 2026-11).
IMAGE_VERSIONS = {
    "accelerate": "1.15.0",
    "huggingface-hub": "1.33.0",
    "numpy": "2.5.2",
    "safetensors": "0.8.0",
    "tokenizers": "0.23.2",
    "torch": "2.11.0",
    "transformers": "5.17.0",
    "triton": "3.6.0",
}
ROOT_PACKAGE = "ovis-server"
EXTRAS = frozenset({"fp8"})
# The GPU machine: CPython 3.12 on Linux x86_64 (manylinux wheels of any of these tags).
TARGET_MARKERS = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in (39, 35, 34, 31, 28, 27, 24, 17)] + [
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
    "linux_x86_64",
]
MAX_BUNDLE_MIB = 60.0


def normalize(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


@dataclass(frozen=True)
class Needed:
    """One installed distribution of the closure, with what it requires."""

    name: str
    version: str
    requires: tuple[Any, ...]  # packaging Requirements, markers already evaluated


def closure(root: str, extras: Iterable[str]) -> dict[str, Needed]:
    """``root`` with ``extras`` and everything it needs, as installed here (by normalized
    name); requirements whose markers do not hold on the GPU machine are left out."""
    from packaging.requirements import Requirement

    found: dict[str, Needed] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    pending: list[tuple[str, frozenset[str]]] = [(root, frozenset(extras))]
    while pending:
        name, wanted = pending.pop()
        key = normalize(name)
        if (key, wanted) in seen:
            continue
        seen.add((key, wanted))
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is needed but not installed here") from None
        requires = []
        for text in dist.requires or []:
            requirement = Requirement(text)
            marker = requirement.marker
            if marker is None or any(
                marker.evaluate({**TARGET_MARKERS, "extra": extra}) for extra in (*wanted, "")
            ):
                requires.append(requirement)
                pending.append((requirement.name, frozenset(requirement.extras)))
        known = found[key].requires if key in found else ()
        merged = {str(r): r for r in (*known, *requires)}
        found[key] = Needed(key, dist.version, tuple(merged.values()))
    return found


def bundle_plan(
    needed: dict[str, Needed],
    image: frozenset[str] = IMAGE_PACKAGES,
    image_versions: dict[str, str] | None = None,
) -> dict[str, str]:
    """{package: why} for each package of ``needed`` to bundle."""
    versions = IMAGE_VERSIONS if image_versions is None else image_versions
    torch_side = set(closure("torch", ())) if "torch" in needed else set()
    plan = {
        name: "not in the GPU image"
        for name in needed
        if name != normalize(ROOT_PACKAGE) and name not in torch_side and name not in image
    }
    changed = True
    while changed:
        changed = False
        users = [needed[normalize(ROOT_PACKAGE)], *(needed[name] for name in plan)]
        for name in sorted(set(needed) & image - plan.keys() - {"torch"}):
            there = versions.get(name)
            ruled_out = [
                f"{user.name} needs {requirement}"
                for user in users
                for requirement in user.requires
                if normalize(requirement.name) == name
                and there is not None
                and not requirement.specifier.contains(there, prereleases=True)
            ]
            depends = sorted(
                normalize(r.name) for r in needed[name].requires if normalize(r.name) in plan
            )
            if ruled_out:
                plan[name] = f"the image has {there}; {ruled_out[0]}"
            elif depends:
                plan[name] = f"needs {', '.join(depends)}, bundled; its pins on them unknown"
            else:
                continue
            changed = True
    return dict(sorted(plan.items()))


def pins(needed: dict[str, Needed], plan: dict[str, str]) -> list[str]:
    return [f"{name}=={needed[name].version}" for name in plan]


def pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", *args]


def target_options() -> list[str]:
    """pip's options that pick wheels for the GPU machine's Python and platform."""
    options = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
    for platform in PLATFORMS:
        options += ["--platform", platform]
    return options


def install_command(directory: Path, target: Path, *, dry_run: bool = False) -> list[str]:
    """The offline install of the bundle in ``directory`` into ``target`` (a folder that
    goes first on PYTHONPATH): no index, no dependencies resolved (the bundle lists every
    one it brings), what the image has left as it is."""
    command = pip("install", "--no-index", "--find-links", str(directory), "--no-deps")
    command += ["--no-compile", "--no-cache-dir", "--upgrade", "--target", str(target)]
    command += ["-r", str(directory / "requirements.txt")]
    if dry_run:
        command += ["--dry-run", "--quiet", *target_options()]
    return command


def bundle_size(directory: Path) -> float:
    """MiB of the wheels in ``directory``."""
    return sum(path.stat().st_size for path in directory.glob("*.whl")) / 2**20


def build(directory: Path, needed: dict[str, Needed], plan: dict[str, str]) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.whl"):
        old.unlink()
    wanted = pins(needed, plan)
    command = pip("download", "--no-deps", "--dest", str(directory), *target_options(), *wanted)
    subprocess.run(command, check=True)
    (directory / "requirements.txt").write_text("\n".join(wanted) + "\n")
    size = bundle_size(directory)
    print(f"{len(wanted)} wheels, {size:.1f} MiB in {directory}")
    if size > MAX_BUNDLE_MIB:
        print(f"over {MAX_BUNDLE_MIB:.0f} MiB: too large to travel with the checkout")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("plan", help="list what would be bundled, and why")
    for name in ("build", "check"):
        sub = commands.add_parser(name)
        sub.add_argument("--dir", type=Path, default=Path(".whl"))
    install = commands.add_parser("install", help="the offline install")
    install.add_argument("dir", type=Path)
    install.add_argument("target", type=Path)
    args = parser.parse_args(argv)

    if args.command == "install":
        return subprocess.run(install_command(args.dir, args.target), check=False).returncode
    if args.command == "check":
        with tempfile.TemporaryDirectory() as target:
            command = install_command(args.dir, Path(target), dry_run=True)
            code = subprocess.run(command, check=False).returncode
        print(f"offline install of {args.dir}: {'would work' if code == 0 else 'FAILS'}")
        return code
    needed = closure(ROOT_PACKAGE, EXTRAS)
    plan = bundle_plan(needed)
    if args.command == "plan":
        for name, why in plan.items():
            print(f"{name}=={needed[name].version}  # {why}")
        return 0
    return build(args.dir, needed, plan)


if __name__ == "__main__":
    sys.exit(main())
