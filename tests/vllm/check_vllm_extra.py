"""Check that `pip install 't0s1[vllm]'` resolves with the newest vLLM on PyPI, using pip's own
resolver, without downloading vLLM's GPU wheels (hundreds of MB each, plus their CUDA libraries).

How: `pip install --dry-run --report` resolves everything and says what it would install.
`--use-feature=fast-deps` makes pip read each wheel's METADATA with HTTP range requests
instead of downloading the wheel (an index that serves the metadata separately, PEP 658, spares even
that). `--isolated` makes pip see PyPI as a new user does: no local wheel folders or constraint files
from this machine's pip configuration.

A vLLM release that does not install even on its own (a dependency it pins missing from PyPI) is
reported, and the release before it is checked instead. The check fails only when vLLM installs on
its own but not together with t0s1. Usage: python tests/vllm/check_vllm_extra.py [PROJECT_DIR]
(`make vllm-extra`; `make test` runs it). Needs PyPI; takes a few minutes, mostly waiting on it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

PIP = [sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check"]
RELEASES_TRIED = 3
SHOWN = ("vllm", "transformers", "tokenizers", "torch", "t0s1")


def vllm_releases() -> list[str]:
    """vLLM's releases on PyPI, newest first (pip's own listing)."""
    listing = subprocess.run([*PIP, "index", "versions", "vllm"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"Available versions: (.+)", listing)
    if not found:
        raise SystemExit(f"pip index versions vllm listed no releases:\n{listing}")
    return [v.strip() for v in found.group(1).split(",")]


def dry_run(requirements: list[str], report: Path) -> subprocess.Popen:
    command = [*PIP, "install", "--dry-run", "--quiet", "--ignore-installed", "--use-feature=fast-deps",
               "--report", str(report), *requirements]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def last_error(output: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith("ERROR")]
    return errors[-1] if errors else output.strip().splitlines()[-1] if output.strip() else "(no output)"


def main() -> int:
    project = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[2]).resolve()
    releases = vllm_releases()
    with tempfile.TemporaryDirectory() as scratch:
        for release in releases[:RELEASES_TRIED]:
            together, alone = Path(scratch) / f"t0s1-{release}.json", Path(scratch) / f"vllm-{release}.json"
            with_t0s1 = dry_run([f"t0s1[vllm] @ {project.as_uri()}", f"vllm=={release}"], together)
            on_its_own = dry_run([f"vllm=={release}"], alone)
            output, alone_output = with_t0s1.communicate()[0], on_its_own.communicate()[0]
            if with_t0s1.returncode == 0:
                installs = {item["metadata"]["name"].lower(): item["metadata"]["version"]
                            for item in json.loads(together.read_text())["install"]}
                chosen = ", ".join(f"{name} {installs[name]}" for name in SHOWN if name in installs)
                newest = "the newest release" if release == releases[0] else f"the newest that installs (newest: {releases[0]})"
                print(f"pip install 't0s1[vllm]' resolves with vllm {release}, {newest}: {chosen}.")
                return 0
            if on_its_own.returncode == 0:
                print(f"pip install 't0s1[vllm]' does not resolve with vllm {release}, which installs on its own:\n{output}")
                return 1
            print(f"vllm {release} does not install from PyPI even on its own ({last_error(alone_output)}); "
                  "checking the release before it.")
    print(f"None of vllm's {RELEASES_TRIED} newest releases installs from PyPI on its own: nothing to check t0s1 against.")
    return 1


if __name__ == "__main__":
    sys.exit(main())
