"""Crash-only ``raft.db``: what a crash leaves behind reopens to whole saves, or is refused.

Two tests, and what each proves:

* ``test_sigkill_during_saves_leaves_each_save_whole_or_absent``: a child process
  (torn_child.py) saves large batches in a loop; the test kills it with SIGKILL at a
  seeded random instant 0-40 ms after the child announced the start of a chosen save (a
  save takes from under 1 ms to ~35 ms here, so the kill lands early, midway or late in
  that save, in a later one or between two), reopens the database, and compares what it
  finds with a replay of the child's seeded plan: every save the child reported as
  written must be there, and the one in flight must be there whole or not at all. The
  next round's child continues from what survived. SIGKILL ends the process, not the
  kernel: every write the child made, fsynced or not, is still in the page cache when
  the database is reopened. So this proves that a save is atomic and that a process
  crash loses no save that returned; it says nothing about durability across a power
  cut or a kernel crash, which rests on the fsyncs (``synchronous=FULL``) and the disk.

* ``test_a_torn_or_damaged_wal_reopens_to_a_prefix_of_the_saves_or_is_refused``: the
  nearest a test can come to what a power cut leaves on disk. It copies a data dir whose
  WAL holds the last few saves, then truncates the WAL, zeroes its tail or flips a byte
  in it (seeded), and reopens the copy: it must hold exactly the saves whose WAL frames
  are intact (SQLite ignores the WAL from the first frame that is incomplete or fails its
  checksum, and an uncommitted transaction's frames), or be refused with StorageCorrupt;
  never a log that is neither.

Each test prints its seed and what every round or trial did (``pytest -s`` shows it);
``LIFERAFT_TORN_SEED=N`` runs both with another seed.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import ModuleType

from liferaft.core import Restored, Snapshot
from liferaft.storage.errors import StorageCorrupt
from liferaft.storage.sqlite import Storage

SEED = int(os.environ.get("LIFERAFT_TORN_SEED", "20240611"))
HERE = Path(__file__).parent

ROUNDS = 12
MAX_KILL_DELAY = 0.040  # seconds after the chosen save began

WAL_SAVES = 8  # saves held in the WAL; small, so no checkpoint moves them into raft.db
WAL_MAX_BATCH = 40  # entries per save
WAL_TRIALS = 60
WAL_HEADER_BYTES = 32
WAL_FRAME_HEADER_BYTES = 24


def load_child() -> ModuleType:
    spec = importlib.util.spec_from_file_location("torn_child", HERE / "torn_child.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- SIGKILL during saves


def run_and_kill(data_dir: Path, seed: str, kill_at: int, delay: float, log: Path) -> int:
    """Run the child until it begins save number ``kill_at``, wait ``delay`` seconds (the
    seeded kill instant, not a wait for anything), kill it; returns the last save it
    reported as written."""
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


def test_sigkill_during_saves_leaves_each_save_whole_or_absent(tmp_path: Path) -> None:
    child = load_child()
    rng = random.Random(SEED)
    data_dir = tmp_path / "n1"
    with Storage.open(data_dir, initial=child.MEMBERS) as storage:
        durable = storage.load()
    outcomes = [f"seed {SEED}"]
    for round_no in range(ROUNDS):
        seed = f"{SEED}/{round_no}"
        kill_at, delay = rng.randint(1, 6), rng.uniform(0, MAX_KILL_DELAY)
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


# ---------------------------------------------------------------- a torn or damaged WAL


def saves_in_the_wal(
    child: ModuleType, data_dir: Path, image: Path
) -> tuple[list[Restored], list[int]]:
    """Create a database in ``data_dir`` (closing it checkpoints everything into raft.db),
    reopen it and make WAL_SAVES seeded saves, then copy the data dir to ``image`` while
    the Storage is still open: as a crash would leave it, with the saves in the WAL only.
    Returns the stored state after k saves and the WAL's size then, for k = 0..WAL_SAVES."""
    with Storage.open(data_dir, initial=child.MEMBERS):
        pass
    db, wal = data_dir / "raft.db", data_dir / "raft.db-wal"
    assert not wal.exists()
    with Storage.open(data_dir) as storage:
        before = db.read_bytes()
        states = [storage.load()]
        sizes = [wal.stat().st_size if wal.exists() else 0]
        ops = child.plan(states[0], random.Random(f"{SEED}/wal"), WAL_MAX_BATCH)
        for _ in range(WAL_SAVES):
            op = next(ops)
            if isinstance(op, Snapshot):
                storage.save_snapshot(op)
            else:
                storage.save(op)
            states.append(storage.load())
            sizes.append(wal.stat().st_size)
        # Every save appended to the WAL and none was checkpointed into raft.db.
        assert db.read_bytes() == before
        assert sizes == sorted(set(sizes)), sizes
        shutil.copytree(data_dir, image)
    return states, sizes


def test_a_torn_or_damaged_wal_reopens_to_a_prefix_of_the_saves_or_is_refused(
    tmp_path: Path,
) -> None:
    image = tmp_path / "image"
    states, sizes = saves_in_the_wal(load_child(), tmp_path / "live", image)
    wal_bytes = (image / "raft.db-wal").read_bytes()
    page_size = int.from_bytes(wal_bytes[8:12], "big")
    frame = WAL_FRAME_HEADER_BYTES + page_size
    assert all((s - WAL_HEADER_BYTES) % frame == 0 for s in sizes[1:]), (sizes, page_size)
    assert len(wal_bytes) == sizes[-1]

    def saves_within(intact: int) -> int:
        """How many saves the first ``intact`` bytes of the WAL hold whole."""
        return max(k for k, size in enumerate(sizes) if size <= intact or k == 0)

    def frame_start(offset: int) -> int:
        """Where the frame holding ``offset`` begins (0 inside the WAL header)."""
        if offset < WAL_HEADER_BYTES:
            return 0
        return offset - (offset - WAL_HEADER_BYTES) % frame

    rng = random.Random(SEED)
    outcomes: Counter[str] = Counter()
    lines = [f"seed {SEED}: WAL of {len(wal_bytes)} bytes, {WAL_SAVES} saves, page {page_size}"]
    for trial in range(WAL_TRIALS):
        data = bytearray(wal_bytes)
        how = rng.choice(["truncate", "zero tail", "flip in last frame", "flip anywhere"])
        if how == "truncate":  # the file ends early, possibly mid-frame
            at = rng.randrange(len(data))
            del data[at:]
            intact = at
        elif how == "zero tail":  # blocks that never reached the disk read back as zeros
            at = rng.randrange(len(data))
            data[at:] = bytes(len(data) - at)
            intact = frame_start(at)
        else:  # a torn or bad sector: one byte differs
            low = len(data) - frame if how == "flip in last frame" else 0
            at = rng.randrange(low, len(data))
            data[at] ^= rng.randrange(1, 256)
            intact = frame_start(at)
        expected = saves_within(intact)
        copy = tmp_path / f"trial{trial}"
        shutil.copytree(image, copy)
        (copy / "raft.db-wal").write_bytes(data)
        what = f"trial {trial}: {how} at byte {at}"
        try:
            with Storage.open(copy) as storage:
                found = storage.load()
        except StorageCorrupt as exc:
            outcomes["refused"] += 1
            lines.append(f"{what}: refused ({exc})")
        else:
            if found != states[expected]:
                got = [k for k, state in enumerate(states) if state == found]
                raise AssertionError(
                    f"{what} (seed {SEED}): expected the first {expected} saves, found "
                    + (f"the first {got[0]}" if got else "a log that is no prefix of the saves")
                )
            outcomes["prefix"] += 1
            lines.append(f"{what}: the first {expected} of {WAL_SAVES} saves")
        shutil.rmtree(copy)
    print("\n".join([*lines, str(dict(outcomes))]))
    assert outcomes["prefix"] > 0, "every damaged WAL was refused: the test checked nothing"
