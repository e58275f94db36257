"""Sweeps that never lose or duplicate a job: kills at every stage, dead runs, damaged cache
entries, stray temporary files, and concurrent overlapping sweeps into one store."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from mlflow import MlflowClient

from conftest import ROOT
from harness.cache import StageCache
from harness.ownership import remove_stale_temps, temp_name

CONFIGS = ["random", "saliency", "ixg", "occlusion"]


def args(tmp_path, cache_dir, sweep: str, methods=CONFIGS) -> list[str]:
    return ["-m", f"xai={','.join(methods)}", "dataset.n=4", "metrics=[srg]",
            f"paths.cache_dir={cache_dir}", f"cache.dir={tmp_path}/stages", f"language.cache_dir={tmp_path}/answers",
            f"tracking.uri=sqlite:///{tmp_path}/store/m.db", f"tracking.artifact_location={tmp_path}/a",
            f"tracking.store_templates={tmp_path}/templates", f"hydra.sweep.dir={tmp_path}/{sweep}"]


def start(cmd_args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "harness", *cmd_args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def kill_at(p: subprocess.Popen, line_part: str, nth: int = 1) -> str:
    """SIGKILL the sweep's whole process group when its output shows ``line_part`` the ``nth`` time."""
    seen, out = 0, []
    for line in p.stdout:
        out.append(line)
        if line_part in line:
            seen += 1
            if seen == nth:
                os.killpg(p.pid, signal.SIGKILL)
                break
    p.wait()
    return "".join(out)


def all_runs(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/store/m.db")
    return client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)


def temporaries(tmp_path) -> list:
    return [p for p in tmp_path.rglob("*~.tmp*")]


# (what to wait for in the sweep's output, which occurrence): kills inside each stage of a job,
# and between two jobs
KILL_POINTS = [("stage predict ...", 1), ("stage explain ...", 1), ("stage metrics ...", 1),
               ("stage artifacts ...", 1), ("stage language ...", 1), ("sweep: job 2 of", 1)]


@pytest.mark.slow  # about 95 s; tests/test_resume.py kills and resumes a sweep in CI
def test_kills_at_every_stage_then_resume(tmp_path, cache_dir, trained_vit):
    """Six SIGKILLs, each at another point of a job, each followed by resuming the sweep: every
    configuration ends as exactly one FINISHED run, the killed runs as KILLED (not RUNNING
    forever), and no temporary file is left behind."""
    for i, (part, nth) in enumerate(KILL_POINTS):
        out = kill_at(start(args(tmp_path, cache_dir, f"sweep{i}")), part, nth)
        assert part in out, out[-3000:]  # the kill happened where it should
    r = start(args(tmp_path, cache_dir, "final"))
    out, _ = r.communicate(timeout=600)
    assert r.returncode == 0, out[-3000:]
    runs = all_runs(tmp_path)
    done = [x for x in runs if x.info.status == "FINISHED"]
    assert sorted(x.data.tags["choice.xai"] for x in done) == sorted(CONFIGS), out[-3000:]  # none lost, none twice
    assert {x.info.status for x in runs} <= {"FINISHED", "KILLED"}  # no zombie RUNNING
    killed = [x for x in runs if x.info.status == "KILLED"]
    assert killed and all("was gone when a sweep resumed" in x.data.tags["killed_reason"] for x in killed)
    assert not temporaries(tmp_path), temporaries(tmp_path)


def test_four_concurrent_overlapping_sweeps_share_the_work(tmp_path, cache_dir, trained_vit):
    """Four sweeps started together on a fresh SQLite store (created once, no migration race),
    over overlapping configurations: each configuration is finished exactly once, and every
    sweep ends with all its jobs done (run by itself or by another sweep) and exit status 0."""
    overlaps = [["random", "saliency"], ["saliency", "ixg"], ["ixg", "random"], ["random", "saliency", "ixg"]]
    procs = [start(args(tmp_path, cache_dir, f"sweep{i}", m)) for i, m in enumerate(overlaps)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [o[-2000:] for o in outs]
    runs = all_runs(tmp_path)
    done = [x for x in runs if x.info.status == "FINISHED"]
    assert sorted(x.data.tags["choice.xai"] for x in done) == ["ixg", "random", "saliency"], outs
    assert len({x.data.tags["config_hash"] for x in done}) == 3
    for o, m in zip(outs, overlaps, strict=True):
        assert f"sweep: {len(m)} jobs: " in o and " 0 failed" in o and "without a run" not in o, o[-2000:]


def test_a_damaged_cache_entry_is_discarded_and_computed_again(tmp_path, caplog):
    cache = StageCache(tmp_path)
    arrays = {"attributions": np.arange(1000, dtype=np.float32).reshape(10, 100)}
    path = cache._path("attributions", "ab" * 32)
    damage = {"truncated": lambda b: b[: len(b) // 2], "empty": lambda b: b"",
              "bit flipped": lambda b: b[:-200] + bytes([b[-200] ^ 0x10]) + b[-199:]}
    for how, hurt in damage.items():
        cache.put("attributions", "ab" * 32, arrays)
        path.write_bytes(hurt(path.read_bytes()))
        with caplog.at_level(logging.WARNING, logger="harness.cache"):
            got = cache.fetch("attributions", "ab" * 32, lambda: arrays)
        np.testing.assert_array_equal(got["attributions"], arrays["attributions"])
        assert "is damaged" in caplog.text, how
        caplog.clear()
        again = StageCache(tmp_path).get("attributions", "ab" * 32)  # recomputed and stored whole
        np.testing.assert_array_equal(again["attributions"], arrays["attributions"])
    assert cache.counts()["cache_damaged_attributions"] == 3
    assert not temporaries(tmp_path)


def test_a_flipped_bit_inside_the_data_is_caught(tmp_path):
    """A flip inside the stored array (npz entries are not compressed, so zip's own CRC is the
    only other guard) is caught by the entry's checksum, whichever check sees it first."""
    cache = StageCache(tmp_path)
    cache.put("predictions", "cd" * 32, {"logits": np.zeros(4096, dtype=np.float32)})
    path = cache._path("predictions", "cd" * 32)
    data = bytearray(path.read_bytes())
    data[data.index(b"\x00" * 64) + 10] ^= 0x01  # inside the logits' zero bytes
    path.write_bytes(bytes(data))
    assert cache.get("predictions", "cd" * 32) is None and not path.exists()


def test_temporary_files_of_dead_processes_are_removed(tmp_path):
    """Files named by :func:`temp_name` of a process that has exited go; this process's stay."""
    dead = subprocess.run([sys.executable, "-c", "from harness.ownership import temp_name; print(temp_name('x.npz'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / dead).write_bytes(b"half")
    (tmp_path / "a" / temp_name("mine.npz")).write_bytes(b"being written")
    (tmp_path / "a" / "ordinary.npz").write_bytes(b"entry")
    assert remove_stale_temps(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted([temp_name("mine.npz"), "ordinary.npz"])


def test_dead_runs_are_reaped_and_live_ones_kept(tmp_path):
    """A RUNNING run whose process is gone (same host: pid and start time; another host: an old
    heartbeat) is marked KILLED; a live one, here or with a fresh heartbeat elsewhere, is not."""
    from harness.ownership import me
    from harness.tracking.claims import reap

    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    eid = client.create_experiment("e")
    gone = subprocess.run([sys.executable, "-c", "from harness.ownership import me; import json; print(json.dumps(me()))"],
                          capture_output=True, text=True, check=True).stdout
    import json

    now = time.time()
    runs = {
        "dead here": {**json.loads(gone), "heartbeat": f"{now:.0f}"},
        "alive here": {**me(), "heartbeat": f"{now - 3600:.0f}"},
        "silent elsewhere": {"owner.host": "elsewhere", "owner.pid": "1", "owner.start": "1", "heartbeat": f"{now - 600:.0f}"},
        "beating elsewhere": {"owner.host": "elsewhere", "owner.pid": "1", "owner.start": "1", "heartbeat": f"{now - 5:.0f}"},
    }
    ids = {name: client.create_run(eid, tags=tags).info.run_id for name, tags in runs.items()}
    reaped = reap(client, eid, stale_after_s=300)
    assert sorted(reaped) == sorted([ids["dead here"], ids["silent elsewhere"]])
    assert {n: client.get_run(i).info.status for n, i in ids.items()} == {
        "dead here": "KILLED", "alive here": "RUNNING", "silent elsewhere": "KILLED", "beating elsewhere": "RUNNING"}


@pytest.mark.parametrize("n_claimants", [8])
def test_one_claim_wins_among_racing_processes(tmp_path, n_claimants):
    """Processes racing to claim one configuration for their own runs: exactly one gets it."""
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    eid = client.create_experiment("e")
    script = ("import sys, time; from mlflow import MlflowClient; from harness.tracking.claims import acquire; "
              f"c = MlflowClient('sqlite:///{tmp_path}/m.db'); from harness.ownership import me; "
              f"r = c.create_run('{eid}', tags=me()).info.run_id; "
              "time.sleep(max(0, float(sys.argv[1]) - time.time())); "
              f"h = acquire(c, '{eid}', 'cfg', r, 300); print('won' if h is None else 'lost'); time.sleep(3)")
    at = time.time() + 12  # all start claiming at once, after their imports
    procs = [subprocess.Popen([sys.executable, "-c", script, str(at)], stdout=subprocess.PIPE, text=True)
             for _ in range(n_claimants)]
    results = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert sorted(results) == ["lost"] * (n_claimants - 1) + ["won"], results
