"""Data layer: sources (mocked TFDS, digits, synthetic array_record), folders, info, augment, pipeline.

Everything runs offline in temporary data directories; nothing here downloads.
"""

from __future__ import annotations

import chex
import io
import json
import os
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from flax_resnet import cli, data
from flax_resnet.data import augment, preparing, sources, synthetic
from flax_resnet.data.digits import digits_dataset_builder as digits_lib
from flax_resnet.data.info import NORMALIZATION
from flax_resnet.errors import DatasetNotPreparedError, UserError


def _take(it, n):
    return [next(it) for _ in range(n)]


def _denormalize(images, name):
    mean, std = NORMALIZATION[name]
    return np.rint((images * np.float32(std) + np.float32(mean)) * 255).astype(np.int32)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tfds"))
    data.get_dataset_info("digits", d)  # prepares on first use
    return d


# ----------------------------------------------------------------------------- mocked TFDS datasets
@pytest.mark.parametrize(
    "name, classes, shape, eval_split",
    [
        ("cifar10", 10, (32, 32, 3), "test"),
        ("cifar100", 100, (32, 32, 3), "test"),
        ("imagenet2012", 1000, (224, 224, 3), "validation"),
    ],
)
def test_mock_datasets_shapes_dtypes_labels(tmp_path, name, classes, shape, eval_split):
    with tfds.testing.mock_data(num_examples=24):
        info = data.get_dataset_info(name, str(tmp_path))
        assert (info.num_classes, info.image_shape, info.eval_split) == (classes, shape, eval_split)
        assert info.train_size == 24 and len(info.class_names) == classes

        it = data.train_iterator(name, batch_size=8, seed=0, data_dir=str(tmp_path))
        assert it.steps_per_epoch == 3
        labels = []
        for batch in _take(it, 3):
            assert batch["image"].shape == (8, *shape) and batch["image"].dtype == np.float32
            assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
            assert np.isfinite(batch["image"]).all()
            # normalised uint8 pixels stay within [(0-mean)/std, (1-mean)/std]
            mean, std = np.array(info.mean), np.array(info.std)
            assert batch["image"].min() >= (-mean / std).min() - 1e-4
            assert batch["image"].max() <= ((1 - mean) / std).max() + 1e-4
            labels.append(batch["label"])
        labels = np.concatenate(labels)
        assert labels.min() >= 0 and labels.max() < classes

        batches = list(data.eval_batches(name, batch_size=10, data_dir=str(tmp_path)))
        assert [b["mask"].sum() for b in batches] == [10, 10, 4]
        assert all(b["image"].shape == (10, *shape) for b in batches)
        assert not batches[-1]["image"][4:].any() and not batches[-1]["label"][4:].any()


def test_mock_cifar10_unaugmented_batches_are_normalised_source_images(tmp_path):
    with tfds.testing.mock_data(num_examples=16):
        src = tfds.data_source("cifar10", split="train", data_dir=str(tmp_path), download=False)
        it = data.train_iterator("cifar10", batch_size=4, seed=1, data_dir=str(tmp_path), augment=False, with_index=True)
        batch = next(it)
        for img, idx, label in zip(batch["image"], batch["index"], batch["label"]):
            ex = src[int(idx)]
            chex.assert_trees_all_equal(_denormalize(img, "cifar10"), ex["image"])
            assert label == ex["label"]


def test_two_process_sharding_covers_every_example_once_per_epoch(tmp_path):
    with tfds.testing.mock_data(num_examples=48):
        iters = [
            data.train_iterator("cifar10", batch_size=8, seed=5, data_dir=str(tmp_path), process_index=p, process_count=2, with_index=True)
            for p in (0, 1)
        ]
        # one process with the same global batch (16) sees the very same batches, augmentation included
        single = data.train_iterator("cifar10", batch_size=16, seed=5, data_dir=str(tmp_path), with_index=True)
        assert [it.steps_per_epoch for it in iters] == [3, 3] == [single.steps_per_epoch] * 2
        for epoch in range(2):
            batches = [_take(it, 3) for it in iters]
            for whole, *parts in zip(_take(single, 3), *batches):
                assert not set(parts[0]["index"]) & set(parts[1]["index"])  # disjoint slices
                for key in ("index", "image", "label"):
                    chex.assert_trees_all_equal(np.concatenate([b[key] for b in parts]), whole[key])
            per_process = [np.concatenate([b["index"] for b in bs]) for bs in batches]
            assert sorted(np.concatenate(per_process).tolist()) == list(range(48)), epoch
        # epochs are fresh permutations
        assert not np.array_equal(iters[0].batch_indices(0), iters[0].batch_indices(3))

        # eval: every example exactly once over both processes, same batch count on each
        seen, counts = [], []
        for p in (0, 1):
            batches = list(data.eval_batches("cifar10", batch_size=10, data_dir=str(tmp_path), process_index=p, process_count=2, with_index=True))
            counts.append(len(batches))
            for b in batches:
                seen.extend(b["index"][b["mask"] > 0].tolist())
        assert counts == [3, 3] and sorted(seen) == list(range(48))


# ----------------------------------------------------------------------------- digits
def test_digits_builder_end_to_end(digits_dir):
    info = data.get_dataset_info("digits", digits_dir)
    assert (info.train_size, info.eval_size, info.eval_split) == (1437, 360, "test")
    assert info.image_shape == (32, 32, 1) and info.class_names == tuple("0123456789")

    opened = sources.open_dataset("digits", digits_dir)
    train = opened.read("train", range(1437))
    test = opened.read("test", range(360))
    train_rows = {int(e["index"]) for e in train}
    test_rows = {int(e["index"]) for e in test}
    assert not train_rows & test_rows and len(train_rows | test_rows) == 1797
    assert np.bincount([int(e["label"]) for e in test], minlength=10).tolist() == [36] * 10

    from sklearn.datasets import load_digits

    raw = load_digits()
    ex = train[0]
    assert ex["label"] == raw.target[ex["index"]]
    chex.assert_trees_all_equal(ex["image"], digits_lib.upscale(raw.images[ex["index"]][None])[0])
    images = np.stack([e["image"] for e in train]).astype(np.float64) / 255
    assert images.max() == 1.0 and images.min() == 0.0
    # the normalisation constants are the train split's statistics
    chex.assert_trees_all_close(images.mean(), NORMALIZATION["digits"][0][0], atol=1e-4)
    chex.assert_trees_all_close(images.std(), NORMALIZATION["digits"][1][0], atol=1e-4)


def test_digits_augmentation_translates_but_never_mirrors(digits_dir):
    opened = sources.open_dataset("digits", digits_dir)
    batch = next(data.train_iterator("digits", batch_size=64, seed=3, data_dir=digits_dir, with_index=True))
    shifts = set()
    for img, idx in zip(_denormalize(batch["image"], "digits"), batch["index"]):
        src = np.pad(opened.read("train", [idx])[0]["image"].astype(np.int32), ((2, 2), (2, 2), (0, 0)))
        match = [(dy, dx) for dy in range(5) for dx in range(5) if np.array_equal(src[dy : dy + 32, dx : dx + 32], img)]
        assert match, "augmented digit is not a translated crop of its source"
        shifts.add(match[0])
    assert len(shifts) > 5  # offsets really vary


def test_same_seed_same_batches_other_seed_different(digits_dir):
    a = _take(data.train_iterator("digits", batch_size=32, seed=7, data_dir=digits_dir), 3)
    b = _take(data.train_iterator("digits", batch_size=32, seed=7, data_dir=digits_dir), 3)
    c = next(data.train_iterator("digits", batch_size=32, seed=8, data_dir=digits_dir))
    for x, y in zip(a, b):
        chex.assert_trees_all_equal(x["image"], y["image"])
        chex.assert_trees_all_equal(x["label"], y["label"])
    assert not np.array_equal(a[0]["label"], c["label"])


def test_restored_iterator_state_continues_identically(digits_dir):
    kw = dict(batch_size=128, seed=11, data_dir=digits_dir)
    uninterrupted = data.train_iterator("digits", **kw)
    assert uninterrupted.steps_per_epoch == 1437 // 128
    expected = _take(uninterrupted, 14)  # crosses the epoch boundary at step 11

    first = data.train_iterator("digits", **kw)
    _take(first, 9)
    state = json.loads(json.dumps(first.get_state()))
    assert state["step"] == 9 and state["epoch"] == 0 and state["batch_in_epoch"] == 9
    first.close()

    resumed = data.train_iterator("digits", **kw)
    resumed.set_state(state)
    for want, got in zip(expected[9:], _take(resumed, 5)):
        chex.assert_trees_all_equal(want["image"], got["image"])
        chex.assert_trees_all_equal(want["label"], got["label"])
    assert resumed.epoch == 1

    other = data.train_iterator("digits", batch_size=64, seed=11, data_dir=digits_dir)
    with pytest.raises(UserError, match="batch_size"):
        other.set_state(state)


def test_grain_workers_give_the_same_stream(digits_dir):
    from absl import flags

    kw = dict(batch_size=100, seed=2, data_dir=digits_dir)
    plain = _take(data.train_iterator("digits", **kw), 4)
    # Workers need absl flags parsed; the library never marks them on its own (opt-in, as the CLI does).
    flags.FLAGS.unparse_flags()
    with pytest.raises(UserError, match=r"enable_worker_processes\(\)"):
        data.train_iterator("digits", num_workers=2, **kw)
    assert not flags.FLAGS.is_parsed()
    data.enable_worker_processes()
    with data.train_iterator("digits", num_workers=2, **kw) as it:
        it.set_state({"step": 1})
        for want, got in zip(plain[1:], _take(it, 3)):
            chex.assert_trees_all_equal(want["image"], got["image"])
            assert type(got["image"]) is np.ndarray


def test_eval_batches_digits_two_processes(digits_dir):
    totals, images = [], []
    for p in (0, 1):
        batches = list(data.eval_batches("digits", batch_size=64, data_dir=digits_dir, process_index=p, process_count=2))
        assert len(batches) == data.num_eval_batches(360, 64, 2) == 3
        totals.append(sum(b["mask"].sum() for b in batches))
        images.append(batches[0]["image"][0])
    assert totals == [180, 180]
    assert not np.array_equal(images[0], images[1])


# ----------------------------------------------------------------------------- real array_record files
def test_synthetic_cifar10_in_real_layout_reads_without_mock(tmp_path):
    d = str(tmp_path)
    synthetic.write_synthetic("cifar10", d, {"train": 40, "test": 12})
    assert os.path.exists(os.path.join(d, "cifar10", "3.0.2", "cifar10-train.array_record-00000-of-00001"))
    info = data.get_dataset_info("cifar10", d)
    assert (info.train_size, info.eval_size) == (40, 12)
    src = tfds.data_source("cifar10", split="test", data_dir=d, download=False)
    batches = list(data.eval_batches("cifar10", batch_size=8, data_dir=d, with_index=True))
    b = batches[1]
    for img, idx in zip(b["image"][:4], b["index"][:4]):
        chex.assert_trees_all_equal(_denormalize(img, "cifar10"), src[int(idx)]["image"])
    batch = next(data.train_iterator("cifar10", batch_size=16, seed=0, data_dir=d))
    assert batch["image"].shape == (16, 32, 32, 3)


def test_flip_and_normalisation_switches_keep_the_stream_and_the_defaults(tmp_path):
    d = str(tmp_path)
    synthetic.write_synthetic("cifar10", d, {"train": 40, "test": 12})
    src = tfds.data_source("cifar10", split="train", data_dir=d, download=False)
    seed, b = 5, 16

    def first_batch(**kw):
        return next(data.train_iterator("cifar10", batch_size=b, seed=seed, data_dir=d, with_index=True, **kw))

    default, crop, raw = first_batch(), first_batch(flip=False), first_batch(flip=False, normalize=False)
    # data order is untouched by the switches, and is the documented permutation
    order = np.random.default_rng([seed, 0]).permutation(40)[:b]
    for batch in (default, crop, raw):
        chex.assert_trees_all_equal(batch["index"], order)
    sources_ = np.stack([src[int(i)]["image"] for i in order])
    # the crop-only stream, from the documented draws: with flips off no image is mirrored
    oy, ox, mirrored = augment.crop_flip_draws(np.random.default_rng([seed, 0, 1]), b, 4, True)
    crops = augment.random_crop_flip(sources_, None, 4, False, draws=(oy, ox, None))
    chex.assert_trees_all_equal(_denormalize(crop["image"], "cifar10"), crops.astype(np.int32))
    # normalisation off: exactly pixel / 255
    chex.assert_trees_all_equal(raw["image"], crops.astype(np.float32) / np.float32(255))
    # defaults unchanged: the same crops, half of them mirrored, normalised with the cifar10 constants
    mean, std = NORMALIZATION["cifar10"]
    want = np.where(mirrored[:, None, None, None], crops[:, :, ::-1], crops)
    chex.assert_trees_all_equal(default["image"], augment.normalize(want, mean, std))
    assert 0 < mirrored.sum() < b

    # eval never augments; with normalisation off it is pixel / 255 too, as is predict's preprocessing
    test = tfds.data_source("cifar10", split="test", data_dir=d, download=False)
    (ev,) = list(data.eval_batches("cifar10", batch_size=12, data_dir=d, normalize=False))
    images = np.stack([test[i]["image"] for i in range(12)])
    chex.assert_trees_all_equal(ev["image"], images.astype(np.float32) / np.float32(255))
    info = data.get_dataset_info("cifar10", d, normalize=False)
    assert info.mean == () and info.std == () and data.get_dataset_info("cifar10", d).mean == mean
    chex.assert_trees_all_equal(data.preprocess_for_eval(images[3], info), ev["image"][3])


def test_uint8_batches_normalised_in_the_step_equal_the_host_normalised(tmp_path):
    """The trainer takes uint8 batches (``uint8=True``) and normalises them inside the jitted
    step (``steps.prepare_images``): same examples, same pixels, and to float32 rounding the
    same values as the float32 batches normalised on the host, with and without
    normalisation, for training and (padded) evaluation batches."""
    import jax

    from flax_resnet.training import steps

    d = str(tmp_path)
    synthetic.write_synthetic("cifar10", d, {"train": 40, "test": 12})
    for norm in (True, False):
        info = data.get_dataset_info("cifar10", d, normalize=norm)
        prepare = jax.jit(lambda x: steps.prepare_images(x, mean=info.mean, std=info.std))  # noqa: B023
        kw = dict(batch_size=16, seed=3, data_dir=d, with_index=True, normalize=norm)
        host, dev = data.train_iterator("cifar10", **kw), data.train_iterator("cifar10", uint8=True, **kw)
        evals = [list(data.eval_batches("cifar10", batch_size=8, data_dir=d, normalize=norm, uint8=u))
                 for u in (False, True)]
        for want, got in [*zip(_take(host, 2), _take(dev, 2)), *zip(*evals)]:
            assert got["image"].dtype == np.uint8 and want["image"].dtype == np.float32
            chex.assert_trees_all_equal({k: v for k, v in got.items() if k != "image"},
                                        {k: v for k, v in want.items() if k != "image"})
            real = got.get("mask", np.ones(len(got["label"]), np.float32)) > 0  # padding: zeros either way
            chex.assert_trees_all_close(np.asarray(prepare(got["image"]))[real], want["image"][real],
                                        rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- image folders
def _png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("pets")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for cls, value in (("cat", 40), ("dog", 200)):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                img = np.full((48 + 8 * i, 64, 3), value, np.uint8)
                img[..., 2] = rng.integers(0, 5, size=img.shape[:2])
                if i % 2:
                    Image.fromarray(img).save(d / f"{i}.jpg", quality=95)
                else:
                    (d / f"{i}.png").write_bytes(_png(img))
    (root / "train" / "dog" / "grey.png").write_bytes(_png(np.full((40, 40), 200, np.uint8)))
    (root / "train" / "cat" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    good = (root / "train" / "cat" / "1.jpg").read_bytes()
    (root / "train" / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "train" / "readme.txt").write_text("not a class folder")
    (root / "train" / ".DS_Store").write_bytes(b"junk")
    return str(root)


def test_folder_dataset_prepare_skips_corrupt_files_and_reads(image_folder, tmp_path, capsys):
    name = f"folder:{image_folder}"
    with pytest.raises(DatasetNotPreparedError, match="flax-resnet prepare folder:"):
        data.get_dataset_info(name, str(tmp_path))

    summary = data.prepare(name, str(tmp_path))
    out = capsys.readouterr().out
    assert "train 9, val 4" in summary and "skipped 3 unreadable" in summary
    assert "corrupt.jpg" in out and "truncated.jpg" in out
    skipped = {os.path.basename(s["path"]) for s in preparing.folder_skipped(name, str(tmp_path))}
    assert skipped == {"corrupt.jpg", "truncated.jpg", "readme.txt"}

    info = data.get_dataset_info(name, str(tmp_path), image_size=32)
    assert info.class_names == ("cat", "dog") and info.image_shape == (32, 32, 3)
    assert (info.train_size, info.eval_size, info.eval_split) == (9, 4, "val")

    opened = sources.open_dataset(name, str(tmp_path))
    files = {int(i): e["file_name"].decode() for i, e in enumerate(opened.read("train", range(9)))}
    batch = next(data.train_iterator(name, batch_size=9, seed=0, data_dir=str(tmp_path), image_size=32, with_index=True))
    assert batch["image"].shape == (9, 32, 32, 3)
    red = _denormalize(batch["image"], "folder")[..., 0].mean(axis=(1, 2))
    for idx, label, r in zip(batch["index"], batch["label"], red):
        cls = files[int(idx)].split(os.sep)[1]
        assert label == info.class_names.index(cls)
        assert abs(r - (40 if cls == "cat" else 200)) < 3  # grey PNG became RGB (200, 200, 200)

    ev = list(data.eval_batches(name, batch_size=3, data_dir=str(tmp_path), image_size=32))
    assert [b["mask"].sum() for b in ev] == [3, 1]
    assert sorted(np.concatenate([b["label"][b["mask"] > 0] for b in ev]).tolist()) == [0, 0, 1, 1]

    # preparing again re-scans the folder
    extra = os.path.join(image_folder, "val", "dog", "extra.png")
    with open(extra, "wb") as f:
        f.write(_png(np.full((30, 30, 3), 200, np.uint8)))
    try:
        assert "train 9, val 5" in data.prepare(name, str(tmp_path), verbose=False)
        assert data.get_dataset_info(name, str(tmp_path)).eval_size == 5
    finally:
        os.remove(extra)


def test_missing_val_folder_is_a_user_error(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="val"):
        data.prepare(f"folder:{tmp_path}", str(tmp_path / "tfds"))


def _folder_with_empty(root, empty_split):
    """train/ and val/ with classes a and b; every class folder of ``empty_split`` holds no image."""
    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = root / split / cls
            d.mkdir(parents=True)
            if split != empty_split:
                (d / "0.png").write_bytes(_png(np.full((16, 16, 3), 9, np.uint8)))
    return root


@pytest.mark.parametrize("empty_split", ["train", "val"])
def test_empty_class_folders_fail_before_anything_is_written(tmp_path, capsys, empty_split):
    root = _folder_with_empty(tmp_path / "imgs", empty_split)
    data_dir = tmp_path / "tfds"
    assert cli.main(["prepare", f"folder:{root}", "--data_dir", str(data_dir)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and "No examples" not in err, err
    assert f"{root / empty_split} holds no images" in lines[0]
    assert str(root / empty_split / "a") in lines[0] and f"{empty_split}/<class>/" in lines[0]
    assert not data_dir.exists()


def test_an_empty_train_class_is_a_user_error(tmp_path):
    root = _folder_with_empty(tmp_path / "imgs", None)
    for f in (root / "train" / "b").iterdir():
        f.unlink()
    with pytest.raises(UserError, match=r"train/b hold no images"):
        data.prepare(f"folder:{root}", str(tmp_path / "tfds"))
    assert not (tmp_path / "tfds").exists()


@pytest.mark.parametrize("damaged", ["all", "class b"])
def test_unreadable_images_only_is_one_line_exit_2(tmp_path, capsys, damaged):
    root = _folder_with_empty(tmp_path / "imgs", None)
    for f in (root / "train").rglob("*.png"):
        if damaged == "all" or f.parent.name == "b":
            f.write_bytes(b"not an image")
    assert cli.main(["prepare", f"folder:{root}", "--data_dir", str(tmp_path / "tfds")]) == 2
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in captured.err and "No examples" not in captured.err, captured.err
    if damaged == "all":
        assert f"none of the 2 files in {root / 'train'} is a readable image" in lines[0]
    else:
        assert f"no readable image in class folder(s) {root / 'train' / 'b'}" in lines[0]
    assert "skipping" in captured.out  # each damaged file is still named


def test_cli_finetune_on_empty_folders_is_one_line_exit_2(tmp_path, capsys):
    root = _folder_with_empty(tmp_path / "imgs", "train")
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")  # never read: the folder check comes first
    workdir = tmp_path / "run"
    argv = ["finetune", "--dataset", f"folder:{root}", "--data_dir", str(tmp_path / "tfds"), "--model", "resnet8",
            "--pretrained", str(weights), "--workdir", str(workdir)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "holds no images" in err and "Traceback" not in err, err
    assert not workdir.exists() and not (tmp_path / "tfds").exists()


# ----------------------------------------------------------------------------- augmentation units
def test_random_crop_flip_is_a_padded_crop_or_its_mirror():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(32, 8, 8, 3), dtype=np.uint8)
    out = augment.random_crop_flip(images, np.random.default_rng(1), pad=4, flip=True)
    mirrored = 0
    for src, got in zip(images, out):
        padded = np.pad(src, ((4, 4), (4, 4), (0, 0)))
        crops = [padded[y : y + 8, x : x + 8] for y in range(9) for x in range(9)]
        plain = any(np.array_equal(c, got) for c in crops)
        flipped = any(np.array_equal(c[:, ::-1], got) for c in crops)
        assert plain or flipped
        mirrored += flipped and not plain
    assert 6 <= mirrored <= 26  # about half of 32


def test_inception_crop_box_respects_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h = (int(v) for v in rng.integers(50, 600, size=2))
        x, y, cw, ch = augment.inception_crop_box(w, h, rng)
        assert 0 <= x and 0 <= y and x + cw <= w and y + ch <= h
        if (cw, ch) != (w, h):
            assert 0.08 * w * h * 0.9 <= cw * ch <= w * h
            assert 3 / 4 * 0.9 <= cw / ch <= 4 / 3 * 1.1
    # an extreme panorama falls back to the widest centred box within the ratio limit
    assert augment.inception_crop_box(1000, 10, np.random.default_rng(0), attempts=0) == (493, 0, 13, 10)


def test_eval_center_crop_is_resize_256_then_crop_224():
    assert augment.center_crop_box(320, 256) == (48.0, 16.0, 224.0, 224.0)
    img = np.random.default_rng(0).integers(0, 256, size=(256, 256, 3), dtype=np.uint8)
    chex.assert_trees_all_equal(augment.crop_resize(img, augment.center_crop_box, 224, 3), img[16:240, 16:240])
    jpeg = io.BytesIO()
    Image.fromarray(np.full((512, 640, 3), 90, np.uint8)).save(jpeg, format="JPEG")
    out = augment.crop_resize(jpeg.getvalue(), augment.center_crop_box, 224, 3)  # via draft decoding
    assert out.shape == (224, 224, 3) and abs(int(out.mean()) - 90) <= 2


# ----------------------------------------------------------------------------- not prepared
def test_unprepared_dataset_fails_fast_with_the_command(tmp_path):
    start = time.perf_counter()
    for call in (
        lambda: data.get_dataset_info("cifar10", str(tmp_path)),
        lambda: data.train_iterator("cifar10", batch_size=8, seed=0, data_dir=str(tmp_path)),
        lambda: data.eval_batches("imagenet2012", batch_size=8, data_dir=str(tmp_path)),
    ):
        with pytest.raises(DatasetNotPreparedError) as e:
            call()
        assert "run `flax-resnet prepare" in str(e.value) and str(tmp_path) in str(e.value)
        assert "\n" not in str(e.value)
    assert time.perf_counter() - start < 5
    assert "`flax-resnet prepare cifar10 --data_dir " in str(
        pytest.raises(DatasetNotPreparedError, data.get_dataset_info, "cifar10", str(tmp_path)).value
    )
    assert not os.path.exists(tmp_path / "downloads")  # nothing was fetched


def test_unknown_dataset_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown dataset"):
        data.get_dataset_info("no_such_dataset_xyz", str(tmp_path))


def test_cli_prepare(tmp_path, capsys):
    assert cli.main(["prepare", "digits", "--data_dir", str(tmp_path)]) == 0
    assert "train 1437, test 360" in capsys.readouterr().out
    if importlib_util_find("tensorflow") is None:
        assert cli.main(["prepare", "cifar10", "--data_dir", str(tmp_path)]) == 2
        assert "pip install 'flax-resnet[prepare]'" in capsys.readouterr().err


def importlib_util_find(name):
    import importlib.util

    return importlib.util.find_spec(name)


def test_num_workers_minus_one_is_one_per_core_but_one(monkeypatch):
    from flax_resnet.data import pipeline

    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert pipeline.auto_workers(-1) == 15 and pipeline.auto_workers(0) == 0 and pipeline.auto_workers(3) == 3
    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert pipeline.auto_workers(-1) == 1
