"""Damaged and edited stores (issue 16, items 6 and 9): each refused with a clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_capture import SmallCNN
from test_store import Failing, cap, chunk_file, files

from peekcore import ActivationStore
from peekcore.errors import StoreDamageError, StoreError


@pytest.fixture
def images(rng):
    return rng.standard_normal((61, 1, 8, 8)).astype(np.float32)


@pytest.fixture
def labelled(images, tmp_path):
    """conv1 and conv2, float32, chunks of 16 (the last one of 13), with labels."""
    data = (images, np.arange(61) % 3)
    return cap(
        SmallCNN(), data, ["conv1", "conv2"], tmp_path / "s.zarr", chunk_size=16, dtype="float32"
    )


def swap(a: Path, b: Path) -> None:
    data = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(data)


def edit_root(path: Path, edit) -> None:
    meta = json.loads((path / "zarr.json").read_text())
    edit(meta["attributes"])
    (path / "zarr.json").write_text(json.dumps(meta))


# ---------------------------------------------------------------- chunk records (item 6)


@pytest.mark.parametrize("read_mode", ["buffered", "direct"])
def test_swapped_chunk_files_are_refused_by_verify_and_reads(labelled, read_mode):
    path = labelled.path
    swap(chunk_file(path, "conv1", 0, 4), chunk_file(path, "conv1", 2, 4))
    store = ActivationStore(path, read_mode=read_mode)
    with pytest.raises(StoreDamageError, match=r"samples 0\.\.15 of layer 'conv1'.*not the chunk"):
        store.verify()
    with pytest.raises(StoreDamageError, match=r"samples 0\.\.15 .*not the chunk written there"):
        store["conv1"].read(0, 16)
    with pytest.raises(StoreDamageError, match="not the chunk written there"):
        list(store["conv1"].chunks())
    with pytest.raises(StoreDamageError, match=r"samples 32\.\.47 .*not the chunk written there"):
        store["conv1"][40]  # a row read through the cut path
    np.testing.assert_array_equal(store["conv2"].read(), labelled["conv2"].read())


def test_a_chunk_copied_in_from_another_store_is_refused(labelled, images, tmp_path):
    other = cap(SmallCNN(seed=1), (images, np.arange(61) % 3), ["conv1", "conv2"],
                tmp_path / "o.zarr", chunk_size=16, dtype="float32")  # fmt: skip
    shutil.copyfile(chunk_file(other.path, "conv2", 3, 4), chunk_file(labelled.path, "conv2", 3, 4))
    store = ActivationStore(labelled.path)
    with pytest.raises(StoreDamageError, match=r"samples 48\.\.60 of layer 'conv2'.*not the chunk"):
        store["conv2"].read(50, 52)  # the padded last chunk, cut
    with pytest.raises(StoreDamageError, match="failed verification"):
        store.verify()


def test_to_xarray_reads_through_the_checks(labelled):
    # xarray's zarr backend read swapped chunk files without complaint (zarr checks only
    # each file's own CRC32C); to_xarray reads through the store's checked path
    path = labelled.path
    want = labelled["conv1"].read()
    da = labelled.to_xarray("conv1")
    np.testing.assert_array_equal(da.values, want)
    np.testing.assert_array_equal(da.isel(sample=slice(20, 40), channel=2).values, want[20:40, 2])
    np.testing.assert_array_equal(da[[3, 50], :, 1].values, want[[3, 50], :, 1])
    np.testing.assert_array_equal(labelled["conv1"].shard(16, 40).to_xarray().values, want[16:40])
    swap(chunk_file(path, "conv1", 0, 4), chunk_file(path, "conv1", 2, 4))
    lazy = ActivationStore(path).to_xarray("conv1")  # nothing read yet
    np.testing.assert_array_equal(lazy.isel(sample=slice(16, 32)).values, want[16:32])
    with pytest.raises(StoreDamageError, match=r"samples 0\.\.15 .*not the chunk written there"):
        np.asarray(lazy.isel(sample=3))
    with pytest.raises(StoreDamageError, match="not the chunk written there"):
        lazy.mean().item()


def test_swapped_label_chunks_and_a_corrupt_one_give_one_clear_error(labelled):
    labels = labelled.labels
    swap(labelled.path / "labels" / "c" / "0", labelled.path / "labels" / "c" / "1")
    store = ActivationStore(labelled.path)
    with pytest.raises(StoreDamageError, match=r"the labels .*labels/c/0 is intact but is not"):
        _ = store.labels
    swap(labelled.path / "labels" / "c" / "0", labelled.path / "labels" / "c" / "1")
    np.testing.assert_array_equal(store.labels, labels)
    last = labelled.path / "labels" / "c" / "3"
    data = bytearray(last.read_bytes())
    data[5] ^= 0x10
    last.write_bytes(bytes(data))
    with pytest.raises(StoreDamageError) as caught:
        _ = store.labels
    message = str(caught.value)
    assert (
        "labels/c/3 fails its CRC32C checksum" in message and "capture the store again" in message
    )
    assert "Stored and computed checksum" not in message  # zarr's codec error is not shown
    with pytest.raises(StoreDamageError, match=r"cannot read the labels"):
        store.verify()


def test_stores_from_before_chunk_records_are_accepted_and_resume_with_them(images, tmp_path):
    """A store without records opens, reads and verifies (``chunk_records`` False: a moved
    chunk is not found there); resuming one records every chunk, as a new capture would."""
    data = (images, np.arange(61) % 4)
    kw = dict(dtype="float16", batch_size=10, chunk_size=16)
    whole = cap(Failing(), data, ["conv1"], tmp_path / "whole.zarr", **kw)
    assert whole.verify()["chunk_records"] is True
    old = tmp_path / "old.zarr"
    shutil.copytree(whole.path, old)
    edit_root(old, lambda attrs: attrs["progress"].pop("crc32c"))
    store = ActivationStore(old)
    assert store.verify()["chunk_records"] is False
    np.testing.assert_array_equal(store["conv1"].read(), whole["conv1"].read())
    np.testing.assert_array_equal(store.labels, whole.labels)
    # an interrupted capture written without records resumes to the same bytes as `whole`
    Failing.budget = 3  # 30 samples: chunk 0 is written
    try:
        with pytest.raises(KeyboardInterrupt):
            cap(Failing(), data, ["conv1"], tmp_path / "part.zarr", **kw)
    finally:
        Failing.budget = -1
    edit_root(tmp_path / "part.zarr", lambda attrs: attrs["progress"].pop("crc32c"))
    resumed = cap(Failing(), data, ["conv1"], tmp_path / "part.zarr", **kw)
    assert files(resumed.path) == files(whole.path)


def test_damaged_chunk_records_are_refused_on_open(labelled):
    def drop_one(attrs):
        attrs["progress"]["crc32c"]["layers/conv1/activations"].pop()

    edit_root(labelled.path, drop_one)
    with pytest.raises(StoreDamageError, match=r"records .*layers/conv1/activations are not 4"):
        ActivationStore(labelled.path)


# ---------------------------------------------------------------- edited metadata (item 9)


@pytest.mark.parametrize("n_samples", [30, 60, 200])
def test_an_edited_n_samples_is_refused_on_open_and_resume(labelled, n_samples):
    edit_root(labelled.path, lambda attrs: attrs.__setitem__("n_samples", n_samples))
    with pytest.raises(StoreDamageError, match="edited or is damaged|changed by hand") as caught:
        ActivationStore(labelled.path)
    assert "incomplete" not in str(caught.value)
    data = (np.zeros((61, 1, 8, 8), np.float32), np.arange(61) % 3)
    with pytest.raises(StoreError, match="edited or is damaged|changed by hand"):
        cap(SmallCNN(), data, ["conv1", "conv2"], labelled.path, chunk_size=16, dtype="float32")


@pytest.mark.parametrize(
    ("key", "value", "said"),
    [
        ("dtype", "int8", "says dtype='int8', not one of float16, bfloat16, float32"),
        ("chunk_size", "16", "no valid n_samples, chunk_size and progress"),
        ("n_samples", 61.0, "no valid n_samples, chunk_size and progress"),
    ],
)
def test_an_edited_dtype_or_a_size_that_is_no_integer_is_refused(labelled, key, value, said):
    # before: a raw KeyError: 'int8'; "16" and 61.0 were taken as 16 and 61
    edit_root(labelled.path, lambda attrs: attrs.__setitem__(key, value))
    with pytest.raises(StoreDamageError, match=said):
        ActivationStore(labelled.path)


def test_a_missing_sample_id_chunk_names_the_samples_it_held(labelled):
    (labelled.path / "sample_id" / "c" / "0").unlink()  # one chunk of all 61 samples
    with pytest.raises(
        StoreDamageError, match=r"sample_id is missing 1 of 1 .*\(samples 0\.\.60\)"
    ):
        ActivationStore(labelled.path)


@pytest.mark.parametrize("group", ["layers", "layers/conv2"])
def test_a_deleted_group_zarr_json_is_refused_on_open(labelled, group):
    (labelled.path / group / "zarr.json").unlink()
    with pytest.raises(StoreDamageError, match=rf"the group {group} has no zarr.json"):
        ActivationStore(labelled.path)


def test_a_store_folder_given_as_data_names_the_fix(labelled):
    # before: "peekcore reads .npy files directly; for other formats load the array yourself"
    import peekcore

    with pytest.raises(ValueError, match=r"a store of layers.*ActivationStore\(.*\)\[layer\]"):
        peekcore.cp_als(str(labelled.path), 2)


def test_a_folder_of_something_else_is_refused_with_the_fix(images, tmp_path):
    # before: "... or its creation did not finish; capture it again", which fails the same way
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    for call in (
        lambda: ActivationStore(tmp_path / "d"),
        lambda: cap(SmallCNN(), images, "conv1", tmp_path / "d"),
    ):
        with pytest.raises(StoreError, match="not an activation store .*choose another path"):
            call()
    assert (tmp_path / "d" / "notes.txt").read_text() == "mine"
