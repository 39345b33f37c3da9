"""Crash-only storage: ``kill -9`` at any instant leaves all of a save or none of it.

A child process (torn_child.py) saves large batches in a loop; the test kills it with
SIGKILL a seeded few milliseconds after it announced the start of a chosen save, reopens
the database, and compares what it finds with a replay of the child's seeded plan: every
save the child reported as written must be there, and the one in flight must be there
whole or not at all. The next round's child continues from what survived.
"""

from __future__ import annotations

import importlib.util
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

from liferaft.storage.sqlite import Storage

SEED = 20240611
ROUNDS = 8
HERE = Path(__file__).parent


def load_child() -> ModuleType:
    spec = importlib.util.spec_from_file_location("torn_child", HERE / "torn_child.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_and_kill(data_dir: Path, seed: str, kill_at: int, delay: float, log: Path) -> int:
    """Run the child until it begins save number ``kill_at``, wait ``delay`` seconds, kill
    it; returns the last save it reported as written."""
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "torn_child.py"), str(data_dir), seed],
            stdout=subprocess.PIPE,
            stderr=err,
        )
        watchdog = threading.Timer(120, proc.kill)  # only if the child hangs
        watchdog.start()
        try:
            assert proc.stdout is not None
            lines = []
            for line in proc.stdout:
                lines.append(line.decode().strip())
                if lines[-1] == f"begin {kill_at}":
                    break
            else:
                proc.wait()
                raise AssertionError(f"child exited {proc.returncode}: {log.read_text()}")
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            lines += proc.stdout.read().decode().split("\n")
            proc.wait()
        finally:
            watchdog.cancel()
            if proc.stdout is not None:
                proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, log.read_text()
    return max((int(x.split()[1]) for x in lines if x.startswith("written ")), default=0)


def test_a_kill_at_any_instant_leaves_each_save_whole_or_absent(tmp_path: Path) -> None:
    child = load_child()
    rng = random.Random(SEED)
    data_dir = tmp_path / "n1"
    with Storage.open(data_dir, initial=child.MEMBERS) as storage:
        durable = storage.load()
    outcomes = []
    for round_no in range(ROUNDS):
        seed = f"{SEED}/{round_no}"
        kill_at, delay = rng.randint(1, 6), rng.uniform(0, 0.004)  # a save takes ~1-5 ms
        written = run_and_kill(data_dir, seed, kill_at, delay, tmp_path / f"child{round_no}.err")
        assert written >= kill_at - 1

        with Storage.open(data_dir) as storage:  # open runs check(): it must pass
            storage.check()
            found = storage.load()
        base = found.snapshot.meta.index if found.snapshot else 0
        assert [e.index for e in found.entries] == list(
            range(base + 1, base + 1 + len(found.entries))
        )
        reported = child.replay(durable, seed, written).restored(child.MEMBERS)
        in_flight = child.replay(durable, seed, written + 1).restored(child.MEMBERS)
        where = f"round {round_no}: killed {delay * 1000:.1f} ms after save {kill_at} began"
        if found == reported:
            outcomes.append(f"{where}: {written} written, save {written + 1} absent")
        elif found == in_flight:
            outcomes.append(f"{where}: {written} written, save {written + 1} whole")
        else:
            raise AssertionError(
                f"{where} (seed {seed!r}), {written} reported written: stored state is neither "
                f"{written} nor {written + 1} saves; log {base + 1}..{base + len(found.entries)}"
                f", hard state {found.hard_state}, reported log ends at "
                f"{reported.entries[-1].index if reported.entries else None}"
            )
        durable = found
    print("\n".join(outcomes))
