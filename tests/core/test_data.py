import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from napari_nucleae.core import store
from napari_nucleae.core.data import ChunkStream, split_crops


def test_split_holds_out_whole_images_and_is_seeded():
    table = pd.DataFrame({"image_id": np.repeat([f"i{k}" for k in range(10)], 30)})
    split = split_crops(table, 0.2, seed=3)
    assert split.by == "image"
    train_ids = set(table["image_id"].iloc[split.train])
    val_ids = set(table["image_id"].iloc[split.val])
    assert not train_ids & val_ids and len(val_ids) == 2
    assert sorted([*split.train, *split.val]) == list(range(300))
    np.testing.assert_array_equal(split_crops(table, 0.2, seed=3).val, split.val)
    assert split_crops(table, 0.0).val.size == 0


def test_stream_reads_whole_chunks_and_shuffles(make_project, monkeypatch):
    monkeypatch.setattr(store, "chunk_rows", lambda size, dtype: 16)
    project = make_project(n=200, n_images=2)
    reads = []
    real_read = store.Project.read_crops

    def read(self, index, **options):
        reads.append(index)
        return real_read(self, index, **options)

    monkeypatch.setattr(store.Project, "read_crops", read)
    rows = np.arange(200)
    stream = ChunkStream(project, rows, 24, shuffle=True, seed=0, buffer_chunks=4)
    first = torch.cat(list(stream))
    assert all(isinstance(r, slice) and r.start % 16 == 0 for r in reads)
    assert len(reads) == 13 and stream.n_batches() == 9
    crops = project.read_crops(slice(None))
    flat = first[:, 0].reshape(200, -1).numpy()
    order = [int(np.flatnonzero((crops.reshape(200, -1) == f).all(1))[0]) for f in flat]
    assert sorted(order) == list(range(200)) and order != list(range(200))
    stream.epoch = 1
    assert not torch.equal(torch.cat(list(stream)), first)
    ordered = ChunkStream(project, rows[rows % 3 == 0], 24, shuffle=False)
    np.testing.assert_array_equal(torch.cat(list(ordered))[:, 0].numpy(), crops[::3])


def test_stream_with_worker_processes_sees_every_crop_once(make_project, monkeypatch):
    monkeypatch.setattr(store, "chunk_rows", lambda size, dtype: 16)
    project = make_project(n=100, n_images=2)
    stream = ChunkStream(project, np.arange(100), 10, shuffle=True)
    batches = list(DataLoader(stream, batch_size=None, num_workers=2))
    assert len(batches) == stream.n_batches(2)
    seen = torch.cat(batches)[:, 0].reshape(100, -1).sum(1).sort().values
    expected = torch.from_numpy(project.read_crops(slice(None))).reshape(100, -1).sum(1)
    torch.testing.assert_close(seen, expected.sort().values)


def test_compact_stream_sends_uint8_as_stored_and_to_batch_scales_it(make_project):
    from napari_nucleae.core.model import to_batch

    project = make_project(n=50, n_images=2, storage_dtype="uint8")
    compact = ChunkStream(project, np.arange(50), 50, shuffle=False, compact=True)
    (batch,) = list(compact)
    assert batch.dtype == torch.uint8
    scaled = to_batch(batch, torch.device("cpu"), channels_last=False)
    torch.testing.assert_close(scaled[:, 0], torch.from_numpy(project.read_crops(slice(None))))
    wide = make_project(n=20, n_images=2)  # uint16: sent as float32
    assert next(iter(ChunkStream(wide, np.arange(20), 8, shuffle=False, compact=True))).dtype == (
        torch.float32
    )
