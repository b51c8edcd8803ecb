"""Training on several processes: the chunk shards, even steps per rank, and a real DDP run
of two CPU processes (gloo) launched by torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_nucleae.cli import main
from napari_nucleae.core import store
from napari_nucleae.core.data import ChunkStream, shard
from napari_nucleae.core.distributed import Ranks
from napari_nucleae.core.errors import InputError
from napari_nucleae.core.model import load_model, read_checkpoint


@pytest.mark.parametrize(("world", "workers"), [(1, 1), (2, 1), (2, 3), (3, 2)])
def test_shards_of_all_ranks_and_workers_are_disjoint_and_cover_the_items(world, workers):
    items = list(range(23))
    shares = [shard(items, r, world, w, workers) for r in range(world) for w in range(workers)]
    assert sorted(i for share in shares for i in share) == items
    rank_zero = [i for w in range(workers) for i in shard(items, 0, world, w, workers)]
    assert sorted(rank_zero) == items[::world]  # a rank's workers split the rank's share


def test_each_rank_streams_its_own_chunks_in_as_many_batches(make_project, monkeypatch):
    monkeypatch.setattr(store, "chunk_rows", lambda size, dtype: 16)
    project = make_project(n=200, n_images=2)  # 13 chunks, the last one short
    rows = np.arange(200)
    streams = [
        ChunkStream(project, rows, 24, shuffle=True, ranks=Ranks(r, 2), even=True) for r in (0, 1)
    ]
    assert [s.n_batches() for s in streams] == [5, 5]  # rank 1's 6 chunks pad to rank 0's 7
    crops = project.read_crops(slice(None)).reshape(200, -1).sum(1)
    seen = []
    for stream in streams:
        batches = list(stream)
        assert len(batches) == stream.n_batches()
        sums = np.concatenate([b[:, 0].reshape(len(b), -1).sum(1).numpy() for b in batches])
        seen.append({int(np.argmin(np.abs(crops - value))) for value in sums})
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(200))
    with pytest.raises(InputError, match="13 chunks of crops cannot be shared by 14"):
        ChunkStream(project, rows, 24, shuffle=True, ranks=Ranks(0, 14), even=True)


def test_distributed_without_torchrun_says_how_to_launch(make_project, capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    project = make_project(n=40, n_images=2)
    assert main(["train", "--project", str(project.path), "--distributed"]) == 1
    assert "expects to be launched by torchrun" in capsys.readouterr().err


def _torchrun(project: Path, *options: str) -> subprocess.CompletedProcess:
    source = Path(__file__).parents[2] / "src"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(source)}
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"),
        *("-m", "napari_nucleae.cli", "train", "--project", str(project), "--distributed"),
        *("--device", "cpu", "--blocks", "2", "--filters", "4", "--latent-dim", "8"),
        *("--batch-size", "8", "--min-steps", "0", "--on-collapse", "warn", *options),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_processes_train_and_resume_one_model(make_project, monkeypatch):
    monkeypatch.setattr(store, "chunk_rows", lambda size, dtype: 16)
    project = make_project(n=192, n_images=4)
    first = _torchrun(project.path, "--epochs", "2")
    assert first.stdout.count("model 'default' trained on cpu for 2 epochs") == 1  # rank 0
    folder = project.model_dir("default")
    history = pd.read_csv(folder / "history.csv")
    assert history["epoch"].tolist() == [1, 2]
    assert np.isfinite(history[["train_loss", "val_loss"]].to_numpy()).all()
    assert sorted(p.name for p in folder.iterdir()) == [
        "best.pt",
        "config.json",
        "history.csv",
        "last.pt",
    ]
    assert load_model(folder).epoch in (1, 2)

    _torchrun(project.path, "--epochs", "1", "--resume")
    last = read_checkpoint(folder / "last.pt")
    assert last["epoch"] == 3 and last["history"]["epoch"] == [1, 2, 3]
    assert pd.read_csv(folder / "history.csv")["epoch"].tolist() == [1, 2, 3]
    assert store.Project.open(project.path).meta.active_model == "default"
