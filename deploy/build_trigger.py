"""Build the trigger Lambda's zip: the handler's code, the Avro schemas and fastavro for Lambda.

    python deploy/build_trigger.py [--out build/trigger.zip] [--python 3.13]

fastavro is downloaded as the manylinux wheel of the Lambda runtime's Python
(x86_64), so the zip can be built on any machine; boto3 comes with the runtime.
Only what `services.ingest.handler` imports goes in: no emulator, no speech engine.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FASTAVRO = "fastavro==1.13.1"
# The modules `services.ingest.handler` imports (see `python -X importtime`).
CODE = [
    "callstream/__init__.py",
    "callstream/aws.py",
    "callstream/config.py",
    "callstream/contract.py",
    "callstream/errors.py",
    "callstream/events.py",
    "callstream/runtime.py",
    "callstream/service.py",
    "callstream/bus",
    "services/__init__.py",
    "services/ingest/__init__.py",
    "services/ingest/handler.py",
    "services/ingest/trigger.py",
    "schemas",
]


def build(out: Path, python: str) -> Path:
    """Write the zip to `out`; return it."""
    with tempfile.TemporaryDirectory() as staging:
        root = Path(staging)
        _fetch_fastavro(root, python)
        for item in CODE:
            source = REPO / item
            target = root / item
            if source.is_dir():
                shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
        out.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(root.rglob("*")):
                if path.is_file():
                    archive.write(path, path.relative_to(root))
    return out


def _fetch_fastavro(root: Path, python: str) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--target",
            str(root),
            "--platform",
            "manylinux2014_x86_64",
            "--implementation",
            "cp",
            "--python-version",
            python,
            "--only-binary=:all:",
            FASTAVRO,
        ],
        check=True,
    )


def main() -> None:
    """Parse options and build."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "build" / "trigger.zip")
    parser.add_argument("--python", default="3.13", help="the Lambda runtime's Python version")
    args = parser.parse_args()
    print(build(args.out, args.python))


if __name__ == "__main__":
    main()
