"""Drift check: the tests that touch a third-party library, run against the lowest release
pyproject.toml allows, every release saint_export/compat.py lists as tested, and the newest
release the range allows, one library at a time, everything else as the lock has it.

    python scripts/check_deps.py                       # all watched libraries (about 45 minutes here, 18 cases)
    python scripts/check_deps.py transformers timm     # some of them
    python scripts/check_deps.py --all-tests           # the whole suite in every case
    python scripts/check_deps.py --write-docs          # also put the table in docs/dependencies.md

It works in its own virtual environment (.drift/, git-ignored), made with uv from
requirements/cpu.txt, and leaves the project's environment alone. Exit 1 when a case fails.
A release newer than the range allows is named under the table: widen the range (and the lock)
only after this script passed on it.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from saint_export.compat import TESTED  # noqa: E402

LOCK = ROOT / "requirements" / "cpu.txt"
VENV = ROOT / ".drift"
DOC = ROOT / "docs" / "dependencies.md"
TABLE_START, TABLE_END = "<!-- check_deps: start -->", "<!-- check_deps: end -->"
WHEELS = Path("/opt/wheels")  # where this project's machines keep torch's CPU build (scripts/lock.sh)

# The tests that exercise each library's behaviour (its internals, its exporter, its runtime).
TESTS = {
    "transformers": ["tests/test_vlm.py", "tests/test_vlm_export.py", "tests/test_compat.py", "tests/test_tune.py",
                     "tests/test_qwen_vl.py", "tests/test_llava_anyres.py", "tests/test_vlm_sizes.py"],
    "timm": ["tests/test_dynamic_reference.py", "tests/test_onnx_parity.py", "tests/test_images.py",
             "tests/test_evaluate.py", "tests/test_pipeline.py"],
    "onnx": ["tests/test_operator.py", "tests/test_onnx_parity.py", "tests/test_precision.py",
             "tests/test_runtime.py", "tests/test_pipeline.py"],
    "onnxscript": ["tests/test_operator.py", "tests/test_onnx_parity.py", "tests/test_precision.py",
                   "tests/test_pipeline.py"],
    "onnx-ir": ["tests/test_operator.py", "tests/test_onnx_parity.py", "tests/test_pipeline.py"],
    "onnxruntime": ["tests/test_operator.py", "tests/test_onnx_parity.py", "tests/test_precision.py",
                    "tests/test_runtime.py", "tests/test_pipeline.py", "tests/test_vlm_export.py"],
    "numpy": ["tests/test_operator.py", "tests/test_runtime.py", "tests/test_images.py", "tests/test_onnx_parity.py",
              "tests/test_pipeline.py"],
}
CASE_TIMEOUT = 20 * 60  # seconds; an old release can hang (onnx 1.21 did, exporting)


@dataclass
class Case:
    package: str
    version: str
    roles: list[str]
    result: str = ""
    passed: bool = False
    changed: str = ""
    seconds: float = 0.0


def declared_ranges() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        specs += extra
    ranges = {}
    for spec in specs:
        requirement = Requirement(spec)
        ranges.setdefault(requirement.name, requirement)
    return ranges


def lower_bound(requirement: Requirement) -> str:
    bounds = [s.version for s in requirement.specifier if s.operator in (">=", "==")]
    if not bounds:
        sys.exit(f"{requirement}: no lower bound in pyproject.toml")
    return str(max(bounds, key=Version))


def newest(spec: str) -> str | None:
    """The newest release matching `spec` for CPython 3.11 (uv resolves just that package)."""
    out = subprocess.run(["uv", "pip", "compile", "-", "--no-deps", "--no-header", "--no-annotate",
                          "--python-version", "3.11", "--quiet"], input=spec, capture_output=True, text=True)
    match = re.search(r"==(\S+)", out.stdout)
    return match[1] if match else None


def locked(package: str) -> str:
    match = re.search(rf"^{re.escape(package)}==(\S+)", LOCK.read_text(), re.M)
    return match[1] if match else "?"


def uv(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "VIRTUAL_ENV": str(VENV)}
    links = ["--find-links", str(WHEELS)] if WHEELS.is_dir() else []
    return subprocess.run(["uv", "pip", *args, *links], capture_output=True, text=True, env=env, cwd=ROOT)


def freeze() -> dict[str, str]:
    out = subprocess.run(["uv", "pip", "freeze"], capture_output=True, text=True,
                         env={**os.environ, "VIRTUAL_ENV": str(VENV)}, cwd=ROOT).stdout
    return dict(line.split("==", 1) for line in out.splitlines() if "==" in line)


def run_case(case: Case, tests: list[str]) -> None:
    start = time.monotonic()
    for step in (("sync", str(LOCK)), ("install", "--no-deps", "-e", ".")):
        out = uv(*step)
        if out.returncode:
            case.result = f"could not set up the lock: {out.stderr.strip().splitlines()[-1]}"
            return
    before = freeze()
    out = uv("install", f"{case.package}=={case.version}")
    if out.returncode:
        case.result = f"does not install beside the lock: {out.stderr.strip().splitlines()[-1]}"
        return
    after = freeze()
    case.changed = ", ".join(f"{name} {after[name]}" for name in sorted(after)
                             if name != case.package and before.get(name) != after[name])
    try:
        test = subprocess.run([str(VENV / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf",
                               *tests], capture_output=True, text=True, cwd=ROOT, timeout=CASE_TIMEOUT)
    except subprocess.TimeoutExpired:
        case.seconds = time.monotonic() - start
        case.result = f"timed out after {CASE_TIMEOUT // 60} minutes"
        return
    case.seconds = time.monotonic() - start
    summary = next((line for line in reversed(test.stdout.splitlines()) if re.search(r"\d+ (passed|failed)", line)),
                   test.stdout.strip().splitlines()[-1] if test.stdout.strip() else test.stderr.strip()[-200:])
    summary = summary.strip("= ")
    failed = re.findall(r"^FAILED (\S+)", test.stdout, re.M)
    case.passed = test.returncode == 0
    case.result = summary if case.passed else f"{summary}; first failure: {failed[0] if failed else '?'}"


def table(cases: list[Case], notes: list[str]) -> str:
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    lines = [f"Run {datetime.date.today()} on {machine} (`python scripts/check_deps.py`); every other package "
             f"as in `requirements/cpu.txt`.", "",
             "| package | version | why | result | also changed | time |", "| --- | --- | --- | --- | --- | --- |"]
    for c in cases:
        lines.append(f"| {c.package} | {c.version} | {', '.join(c.roles)} | {'passed: ' if c.passed else 'FAILED: '}"
                     f"{c.result} | {c.changed or '—'} | {c.seconds:.0f} s |")
    return "\n".join(lines + ([""] + notes if notes else []))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("packages", nargs="*", metavar="PACKAGE",
                        help=f"libraries to check (default: all of {', '.join(TESTS)})")
    parser.add_argument("--all-tests", action="store_true", help="run the whole suite in every case")
    parser.add_argument("--write-docs", action="store_true", help=f"put the table in {DOC.relative_to(ROOT)}")
    args = parser.parse_args()
    unknown = sorted(set(args.packages) - set(TESTS))
    if unknown:
        parser.error(f"not watched: {', '.join(unknown)} (choose from {', '.join(TESTS)})")
    ranges = declared_ranges()
    cases, notes = [], []
    for package in args.packages or list(TESTS):
        requirement = ranges[package]
        versions: dict[str, list[str]] = {}
        versions.setdefault(lower_bound(requirement), []).append("lowest allowed")
        for version in TESTED.get(package, ()):
            versions.setdefault(version, []).append("listed in compat.TESTED")
        top = newest(str(requirement))
        if top:
            versions.setdefault(top, []).append("newest allowed")
        versions.setdefault(locked(package), []).append("the lock")
        beyond = newest(package)
        if beyond and top and Version(beyond) > Version(top):
            notes.append(f"- {package} {beyond} is out but outside `{requirement}`: not tested, not allowed.")
        cases += [Case(package, v, roles) for v, roles in sorted(versions.items(), key=lambda kv: Version(kv[0]))]
    if not VENV.exists():
        subprocess.run(["uv", "venv", "--quiet", "--python", sys.executable, str(VENV)], check=True)
    for case in (bar := tqdm(cases, unit="case")):
        bar.set_description(f"{case.package} {case.version}")
        run_case(case, ["tests"] if args.all_tests else TESTS[case.package])
        tqdm.write(f"{case.package} {case.version}: {'passed' if case.passed else 'FAILED'} ({case.result})")
    text = table(cases, notes)
    print(text)
    if args.write_docs:
        doc = DOC.read_text()
        start, end = doc.index(TABLE_START) + len(TABLE_START), doc.index(TABLE_END)
        DOC.write_text(doc[:start] + "\n" + text + "\n" + doc[end:])
    return 0 if all(c.passed for c in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
