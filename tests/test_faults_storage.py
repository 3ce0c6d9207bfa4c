"""Storage faults during `t0s1 index build` and `t0s1 eval`, in real processes: killed with SIGKILL
mid-run, and a disk that fills up. Nothing that was finished is lost, nothing half-written is
left or read, and a full disk is a clear error (exit code 2 naming the file), not a traceback.

The full disk is a small tmpfs (where this machine lets the tests mount one: root), and a file
size limit (``RLIMIT_FSIZE``) on the child process, under which a write past the limit fails with
EFBIG the way a write to a full disk fails with ENOSPC.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from t0s1.rag.store import open_index
from t0s1.rag.synthetic import make_corpus, to_t0_rows

CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def t0s1(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "t0s1", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=CHILD_ENV, **popen)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = process.communicate(timeout=timeout)
    return process.returncode, " ".join(err.split())


def says(err: str, *fragments: str) -> bool:
    """Whether stderr holds every fragment (rich wraps long lines, even inside a path)."""
    flat = "".join(err.split())
    return all("".join(fragment.split()) in flat for fragment in fragments)


def kill_when(process: subprocess.Popen, ready, timeout: float = 120) -> None:
    """SIGKILL ``process`` as soon as ``ready()`` is true (polled every few milliseconds)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"the process ended before the kill: {process.communicate()}"
        assert time.monotonic() < deadline, "the moment to kill never came"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.communicate()  # reaped: its temporary folders now belong to no live process


def write_corpus(path: Path, documents: int, seed: int = 5) -> Path:
    rows = to_t0_rows(make_corpus(documents, seed=seed)[0])
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def top_hits(index_path: Path, query: str = "persistent cough and fever") -> list[str]:
    return [hit.doc_id for hit in open_index(index_path).search(query, 5)]


def complete_lines(path: Path) -> list[str]:
    data = path.read_bytes()
    return data[: data.rfind(b"\n") + 1].decode("utf-8").splitlines()


# -- a small disk


def _can_mount() -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    probe = Path(f"/tmp/t0s1-tmpfs-probe-{uuid.uuid4().hex}")
    probe.mkdir()
    try:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True).returncode:
            return False
        subprocess.run(["umount", str(probe)], check=True)
        return True
    finally:
        probe.rmdir()


CAN_MOUNT = _can_mount()
DISKS = [
    pytest.param("tmpfs", marks=pytest.mark.skipif(not CAN_MOUNT, reason="cannot mount a tmpfs here (needs root)")),
    "file size limit",
]


@contextmanager
def small_disk(folder: Path, size: int, kind: str):
    """``(folder, popen keyword arguments)``: ``folder`` is a tmpfs of ``size`` bytes, or (``kind``
    "file size limit") a plain folder and a child process that cannot write a file past ``size``."""
    folder.mkdir(parents=True)
    if kind == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
        try:
            yield folder, {}
        finally:
            subprocess.run(["umount", "-l", str(folder)], check=True)
        return

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    yield folder, {"preexec_fn": limit_file_size}


# -- t0s1 index build


def test_a_build_killed_midway_leaves_the_previous_index_usable_and_the_next_build_cleans_up(tmp_path):
    small, large = write_corpus(tmp_path / "small.jsonl", 60), write_corpus(tmp_path / "large.jsonl", 4000, seed=6)
    out = tmp_path / "index"
    assert finish(t0s1("index", "build", str(small), "--out", str(out)))[0] == 0
    before, manifest = top_hits(out), (out / "manifest.json").read_bytes()

    building = t0s1("index", "build", str(large), "--out", str(out), "--overwrite")
    debris = f".{out.name}.building-*"
    kill_when(building, lambda: any((p / "documents.arrow").exists() for p in tmp_path.glob(debris)))

    assert (out / "manifest.json").read_bytes() == manifest  # the previous index, untouched
    assert top_hits(out) == before
    assert list(tmp_path.glob(debris))  # what the killed build left
    code, err = finish(t0s1("index", "build", str(large), "--out", str(out), "--overwrite"))
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index", "large.jsonl", "small.jsonl"]
    assert open_index(out).manifest["documents"] == 4000


@pytest.mark.parametrize("disk_kind", DISKS)
def test_a_full_disk_during_a_build_keeps_the_previous_index_and_says_so(tmp_path, disk_kind):
    small, large = write_corpus(tmp_path / "small.jsonl", 30), write_corpus(tmp_path / "large.jsonl", 3000, seed=6)
    with small_disk(tmp_path / "disk", 256 * 1024, disk_kind) as (disk, limits):
        out = disk / "index"
        assert finish(t0s1("index", "build", str(small), "--out", str(out), **limits))[0] == 0
        before = top_hits(out)
        code, err = finish(t0s1("index", "build", str(large), "--out", str(out), "--overwrite", **limits))
        assert code == 2, err
        assert says(err, "Could not write", "The previous index in", "is kept") and "Traceback" not in err
        assert top_hits(out) == before
        assert sorted(p.name for p in disk.iterdir()) == ["index"]  # nothing half-written beside it


# -- t0s1 eval


def eval_args(model_dir: Path, data_dir: Path, out: Path, limit: int) -> list[str]:
    return ["eval", "--model", str(model_dir), "--tasks", "gsm8k", "--limit", str(limit), "--max-thinking-tokens", "16,32",
            "--num-ignore", "0", "--max-answer-tokens", "16", "--batch-size", "1", "--data-dir", str(data_dir),
            "--out", str(out), "--device", "cpu"]


def test_an_eval_killed_midway_resumes_to_the_same_results(tmp_path, tiny_model_dir, shared_data_dir):
    straight = finish(t0s1(*eval_args(tiny_model_dir, shared_data_dir, tmp_path / "straight", 24)))
    assert straight[0] == 0, straight[1]

    out = tmp_path / "killed"
    log = out / "samples" / "gsm8k.jsonl"
    running = t0s1(*eval_args(tiny_model_dir, shared_data_dir, out, 24))
    kill_when(running, lambda: log.is_file() and log.stat().st_size > 0)
    assert not (out / "results.json").exists()  # killed before the end
    kept = complete_lines(log)
    code, err = finish(t0s1(*eval_args(tiny_model_dir, shared_data_dir, out, 24)))
    assert code == 0, err
    assert (out / "results.json").read_bytes() == (tmp_path / "straight" / "results.json").read_bytes()
    assert log.read_text(encoding="utf-8").splitlines()[: len(kept)] == kept  # logged rows kept as they were


@pytest.mark.parametrize("disk_kind", DISKS)
def test_a_full_disk_during_an_eval_stops_it_clearly_and_a_rerun_completes_it(tmp_path, tiny_model_dir, shared_data_dir, disk_kind):
    straight = finish(t0s1(*eval_args(tiny_model_dir, shared_data_dir, tmp_path / "straight", 12)))
    assert straight[0] == 0, straight[1]
    with small_disk(tmp_path / "disk", 16 * 1024, disk_kind) as (disk, limits):
        code, err = finish(t0s1(*eval_args(tiny_model_dir, shared_data_dir, disk / "run", 12), **limits))
        assert code == 2, err
        assert says(err, "Could not write", "samples/gsm8k.jsonl", "rows logged before are kept") and "Traceback" not in err
        assert not (disk / "run" / "results.json").exists()
        shutil.copytree(disk / "run", tmp_path / "resumed")  # more room: the same files on a larger disk
    log = tmp_path / "resumed" / "samples" / "gsm8k.jsonl"
    kept = complete_lines(log)
    assert kept and all(json.loads(line)["id"] for line in kept)  # complete rows, readable
    code, err = finish(t0s1(*eval_args(tiny_model_dir, shared_data_dir, tmp_path / "resumed", 12)))
    assert code == 0, err
    assert (tmp_path / "resumed" / "results.json").read_bytes() == (tmp_path / "straight" / "results.json").read_bytes()
    assert log.read_text(encoding="utf-8").splitlines()[: len(kept)] == kept


def test_a_directory_written_atomically_is_whole_or_absent_and_has_the_usual_mode(tmp_path):
    """``files.atomic_directory``: a failing writer leaves nothing; a finished directory has the mode
    a plain ``mkdir`` gives (mkdtemp's 0700 would hide a shared cache from other users); a second
    writer of the same directory keeps the first one's."""
    from t0s1.files import atomic_directory

    target = tmp_path / "converted"
    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / "half").write_text("x")
        raise RuntimeError("killed midway")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_directory(target) as staging:
        (staging / "whole").write_text("first")
    (tmp_path / "plain").mkdir()
    assert target.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777 != 0o700
    with atomic_directory(target) as staging:
        (staging / "whole").write_text("second")
    assert (target / "whole").read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["converted", "plain"]

