"""Build each Lambda function's zip from the package itself, never from a hand-kept list.

    python deploy/build_lambdas.py [--out build/] [--python 3.11] [trigger persister sentiment]

For a function, the zip holds:
- the project's modules its handler module imports (its import closure, found by
  importing it in a fresh interpreter and reading `sys.modules`), and `schemas/`
  at the root, where `callstream.contract` looks for it;
- the third-party distributions it needs that the Lambda Python runtime lacks:
  the base dependencies the closure imports (fastavro; numpy is not imported),
  plus every requirement of the extras the function declares (`lambda`:
  aws-lambda-powertools; `sentiment`: vaderSentiment), with their own
  requirements. Versions are the installed ones, as tested; wheels are fetched
  for the Lambda platform (manylinux x86_64, `--python`), so any machine can build.
- never boto3 and its requirements: the runtime provides them.

`tests/integration/test_deploy_lambdas.py` unpacks each zip into a clean
interpreter holding only boto3, imports the handler and invokes it.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
PROJECT = "callstream"  # the distribution pyproject.toml describes
PROJECT_PACKAGES = ("callstream", "services")
RUNTIME_ROOT = "boto3"  # the Lambda Python runtime provides boto3 and its requirements
PLATFORM = "manylinux2014_x86_64"
# Imports the handler module in a fresh interpreter; prints what it loaded.
_CLOSURE_SCRIPT = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
files = sorted(
    m.__file__ for n, m in list(sys.modules.items())
    if n.split(".")[0] in sys.argv[2].split(",") and getattr(m, "__file__", None)
)
print(json.dumps({"files": files, "tops": sorted({n.split(".")[0] for n in sys.modules})}))
"""


@dataclass(frozen=True)
class Function:
    """One Lambda function: its handler (`module.function`) and the extras it runs with."""

    name: str
    handler: str
    extras: tuple[str, ...] = ()

    @property
    def module(self) -> str:
        """The handler's module."""
        return self.handler.rsplit(".", 1)[0]


FUNCTIONS = {
    f.name: f
    for f in (
        Function("trigger", "services.ingest.lambda_function.lambda_handler"),
        Function("persister", "services.persister.lambda_function.lambda_handler", ("lambda",)),
        Function(
            "sentiment",
            "services.sentiment.lambda_function.lambda_handler",
            ("lambda", "sentiment"),
        ),
    )
}


def build(function: Function, out_dir: Path, python: str) -> Path:
    """Write `<out_dir>/<name>.zip` for `function`; return its path."""
    files, tops = import_closure(function.module)
    with tempfile.TemporaryDirectory() as staging:
        root = Path(staging)
        pins = sorted(distributions_to_pack(tops, function.extras, python).items())
        _install_wheels(root, pins, python)
        base = _source_root()
        for source in files:
            target = root / source.relative_to(base)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        shutil.copytree(REPO / "schemas", root / "schemas")
        out = out_dir / f"{function.name}.zip"
        _zip(root, out)
    return out


def import_closure(module: str) -> tuple[list[Path], set[str]]:
    """The project's source files `module` imports, and every top-level module loaded."""
    result = subprocess.run(
        [sys.executable, "-c", _CLOSURE_SCRIPT, module, ",".join(PROJECT_PACKAGES)],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    if result.returncode != 0:
        raise RuntimeError(f"importing {module} failed:\n{result.stderr}")
    loaded = json.loads(result.stdout)
    return [Path(f) for f in loaded["files"]], set(loaded["tops"])


def distributions_to_pack(
    imported_tops: set[str], extras: tuple[str, ...], python: str
) -> dict[str, str]:
    """{distribution: version} the zip must carry: imported base dependencies and the
    function's extras, with their requirements, less what the runtime provides."""
    owners = metadata.packages_distributions()
    imported = {_norm(d) for top in imported_tops for d in owners.get(top, [])}
    base = _project_requirements(())
    wanted = {d for d in base if d in imported} | (_project_requirements(extras) - base)
    needed = set().union(*(_closure(d, python) for d in wanted)) if wanted else set()
    return {d: metadata.version(d) for d in needed - _closure(RUNTIME_ROOT, python)}


def _project_requirements(extras: tuple[str, ...]) -> set[str]:
    """Names pyproject.toml requires: its dependencies, and those of `extras` (expanded)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    texts = list(project["dependencies"])
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in project["optional-dependencies"][extra]:
            requirement = Requirement(text)
            if _norm(requirement.name) == PROJECT:
                todo.extend(requirement.extras)
            else:
                texts.append(text)
    return {_norm(Requirement(text).name) for text in texts}


def _requirements(dist: str, extras: tuple[str, ...], python: str) -> set[str]:
    """Names `dist` requires on the Lambda runtime, unconditionally or for one of `extras`."""
    target = {"sys_platform": "linux", "platform_system": "Linux", "os_name": "posix"}
    target |= {"platform_machine": "x86_64", "implementation_name": "cpython"}
    target |= {"python_version": python, "python_full_version": f"{python}.0"}
    names = set()
    for text in metadata.requires(dist) or []:
        requirement = Requirement(text)
        marker = requirement.marker
        if marker is None or any(
            marker.evaluate({**target, "extra": extra}) for extra in ("", *extras)
        ):
            names.add(_norm(requirement.name))
    return names


def _closure(dist: str, python: str) -> set[str]:
    """`dist` and everything it requires, transitively (installed distributions only)."""
    seen: set[str] = set()
    todo = [_norm(dist)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            todo.extend(_requirements(name, (), python))
        except metadata.PackageNotFoundError:
            continue  # an optional requirement not installed here is not needed either
    return seen


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _source_root() -> Path:
    """The directory holding the project's packages (the repo, or site-packages)."""
    import callstream

    return Path(callstream.__file__).resolve().parent.parent


def _install_wheels(root: Path, pins: list[tuple[str, str]], python: str) -> None:
    if not pins:
        return
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
    command += ["--target", str(root), "--platform", PLATFORM, "--implementation", "cp"]
    command += ["--python-version", python, "--only-binary=:all:"]
    subprocess.run(command + [f"{name}=={version}" for name, version in pins], check=True)
    for cache in root.rglob("__pycache__"):
        shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(root / "bin", ignore_errors=True)


def _zip(root: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                archive.write(path, path.relative_to(root))


def main() -> None:
    """Parse options and build the named functions (default: all)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(FUNCTIONS)}")
    parser.add_argument("--out", type=Path, default=REPO / "build")
    parser.add_argument("--python", default="3.11", help="the Lambda runtime's Python version")
    args = parser.parse_args()
    unknown = set(args.names) - set(FUNCTIONS)
    if unknown:
        parser.error(f"unknown functions {sorted(unknown)}; known: {', '.join(FUNCTIONS)}")
    for name in args.names or FUNCTIONS:
        print(build(FUNCTIONS[name], args.out, args.python))


if __name__ == "__main__":
    main()
