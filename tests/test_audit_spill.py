"""The audit's per-image arrays live on local disk (``cdam_worker/audit/spill.py``): they read and write as numpy
arrays, are sent to Ray tasks as plain copies, and ``release`` hands their pages back without losing a value, so
the driver's resident memory does not grow with the run."""

from __future__ import annotations

import mmap
import pickle
from pathlib import Path

import numpy as np
import pytest

from bench.synthetic_run import write_synthetic_run
from cdam_worker.audit.gather import gather
from cdam_worker.audit.spill import Spill, release
from cdam_worker.reading import open_run

STATUS = Path("/proc/self/status")


def resident_file_kib() -> int:
    """This process's resident file-backed memory (Linux ``RssFile``), KiB."""
    line = next(line for line in STATUS.read_text().splitlines() if line.startswith("RssFile:"))
    return int(line.split()[1])


def mapped(array: np.ndarray) -> bool:
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base.obj if isinstance(base, memoryview) else base, mmap.mmap)


def test_a_spilled_array_reads_writes_and_pickles_as_an_array(tmp_path: Path) -> None:
    spill = Spill(str(tmp_path))
    array = spill.empty((1000, 7, 7), np.float16)
    assert mapped(array) and array.flags.writeable and not array.any()
    array[::3] = 1.5
    assert list(tmp_path.iterdir()) == []  # unnamed: nothing left behind in the folder
    copy = pickle.loads(pickle.dumps(array[:6]))  # a Ray task gets a plain copy
    assert not mapped(copy) and np.array_equal(copy[:, 0, 0], [1.5, 0, 0, 1.5, 0, 0])
    copied = pickle.loads(pickle.dumps(spill))
    assert copied.folder == str(tmp_path) and copied._maps == []
    assert spill.empty((0, 7), np.float32).shape == (0, 7)


@pytest.mark.skipif(not STATUS.exists(), reason="resident memory is read from /proc (Linux)")
def test_release_hands_the_pages_back_and_keeps_the_values() -> None:
    spill = Spill()
    array = spill.empty((64, 1024, 1024), np.uint8)  # 64 MiB
    before = resident_file_kib()
    array[:] = 7
    assert resident_file_kib() - before > 60 * 1024
    release(array[5:9].reshape(-1))  # a view finds its mapping
    assert resident_file_kib() - before < 8 * 1024
    assert int(array[::7, ::97, ::89].sum()) == 7 * array[::7, ::97, ::89].size
    spill.release()
    assert resident_file_kib() - before < 8 * 1024


def test_gather_writes_the_maps_and_features_to_the_spill(tmp_path: Path) -> None:
    """What the audit reads of a run is disk-backed, row for row the same as the run's maps."""
    dest = str(tmp_path / "run")
    write_synthetic_run(dest, 96, n_classes=3, n_targets=2, grid=(4, 4), n_heads=2, embed_dim=8, images_per_shard=32)
    run = open_run(dest)
    gathered = gather(run, "pred", None)
    assert len(gathered.rows) == 96
    assert mapped(gathered.class_maps) and mapped(gathered.features.share) and mapped(gathered.target_shares)
    maps = run.read_rows("cdam", gathered.rows).astype(np.float32)
    slot = (run.read_rows("target_class", gathered.rows) == gathered.classes[:, None]).argmax(axis=1)
    assert np.array_equal(gathered.class_maps, maps[np.arange(96), slot])
    grouped = np.lexsort((gathered.rows, gathered.classes))
    assert np.array_equal(grouped, np.arange(96))  # a class's images are one stretch, in row order
    assert np.array_equal(
        gathered.rows[gathered.in_row_order(gathered.classes != 1)], np.sort(gathered.rows[gathered.classes != 1])
    )
