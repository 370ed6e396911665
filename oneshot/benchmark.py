"""Benchmark tables: read-only lookups of a cell's trained accuracy (NAS-Bench-201).

``BenchmarkTable.load(path)`` reads either a CSV with an ``arch`` column (NB201's canonical
strings, ``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|``) and accuracy columns, the official
NAS-Bench-201 ``.pth`` file through the ``nas_201_api`` package, or NATS-Bench's topology
benchmark (the NB201 cells; ``NATS-tss-v1_0-*.pickle.pbz2`` or its ``-simple`` directory of one
file per cell) through the ``nats_bench`` package (both: ``pip install 'oneshot[nb201]'``). Either
API gets the file's contents after we unpickle them ourselves, restricted to plain data
(``torch.load(weights_only=True)``; for NATS' bz2 pickles an unpickler that knows no class but
``OrderedDict``/``set``/numpy scalars): the APIs would unpickle with the pickle's full powers.
``lookup(genotype)`` gives ``{column: accuracy}`` or ``None`` for an arch the table does not have. The search logs these per epoch (``lightning_modules/benchmark.py``);
nothing in the product needs a table to run (Dong & Yang, "NAS-Bench-201", ICLR 2020).
"""

from __future__ import annotations

import bz2
import collections
import csv
import math
import pickle
from pathlib import Path

from oneshot.validate import ConfigError

# Columns logged by default: accuracies named like the shared table's (cifar10_test, ...).
ACCURACY_SUFFIXES = ("_test", "_valid", "_acc", "_accuracy")
# The official API's datasets and the names we log them under (its 200-epoch, seed-mean numbers).
OFFICIAL = {
    "cifar10_valid": ("cifar10-valid", "valid-accuracy"),
    "cifar10_test": ("cifar10", "test-accuracy"),
    "cifar100_valid": ("cifar100", "valid-accuracy"),
    "cifar100_test": ("cifar100", "test-accuracy"),
    "imagenet16_valid": ("ImageNet16-120", "valid-accuracy"),
    "imagenet16_test": ("ImageNet16-120", "test-accuracy"),
}


NATS_EXT = "pickle.pbz2"
NATS_META = f"meta.{NATS_EXT}"


class BenchmarkError(ConfigError):
    """A table that cannot be used: one line naming the file and what is wrong."""


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain data only: containers, numbers, strings, and the few classes NATS-Bench's
    files hold (``OrderedDict``, sets, numpy scalars). Any other class - the way a pickle runs
    code - is refused."""

    ALLOWED = {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
               ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}  # fmt: skip

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which plain data does not")


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _check_keys(data, keys: tuple[str, ...], path: Path, what: str) -> None:
    if not isinstance(data, dict) or any(k not in data for k in keys):
        found = ", ".join(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise BenchmarkError(f"benchmark.path={path} is not a {what} file: it needs the keys "
                             f"{', '.join(keys)}; it has {found or 'none':.200}")  # fmt: skip


def _plain_pickle(path: Path, where: str):
    try:
        with bz2.open(path, "rb") as f:
            return _PlainUnpickler(f).load()
    except Exception as e:  # noqa: BLE001 - any unreadable or unsafe file is one line
        raise BenchmarkError(f"{where} is not a NATS-Bench file we can read safely (plain data only): "
                             f"{_first_line(e):.200}") from None  # fmt: skip


class BenchmarkTable:
    def __init__(self, rows: dict[str, dict[str, float]] | None, path: Path, api=None,
                 archive: Path | None = None):  # fmt: skip
        self.rows, self.path, self.api = rows, Path(path), api
        self.archive = archive  # a NATS-Bench -simple directory, read cell by cell

    @classmethod
    def load(cls, path, columns: list[str] | None = None) -> BenchmarkTable:
        path = Path(path)
        if path.is_dir() and (path / NATS_META).is_file():
            return cls._nats(path)
        if not path.is_file():
            raise BenchmarkError(f"benchmark.path={path} not found; give a CSV with an 'arch' column "
                                 "and accuracy columns, the official NAS-Bench-201 .pth file, or a NATS-Bench "
                                 "topology file (.pickle.pbz2) or its -simple directory")  # fmt: skip
        if path.name.endswith(".pbz2"):
            return cls._nats(path)
        if path.suffix in (".pth", ".pickle", ".pkl"):
            return cls._official(path)
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            if "arch" not in header:
                raise BenchmarkError(f"benchmark.path={path} has no 'arch' column; its columns: {', '.join(header) or 'none'}")  # fmt: skip
            wanted = columns or [c for c in header if c.endswith(ACCURACY_SUFFIXES)]
            missing = [c for c in wanted if c not in header]
            if missing or not wanted:
                raise BenchmarkError(
                    f"benchmark.path={path}: no accuracy column {', '.join(missing)}; valid: "
                    + ", ".join(c for c in header if c != "arch")
                )
            rows = {}
            for n, row in enumerate(reader, start=2):
                try:
                    rows[row["arch"].strip()] = {c: float(row[c]) for c in wanted}
                except (TypeError, ValueError):
                    raise BenchmarkError(
                        f"benchmark.path={path} line {n}: not a number in {wanted}"
                    ) from None
        return cls(rows, path)

    @classmethod
    def _official(cls, path: Path) -> BenchmarkTable:
        try:
            from nas_201_api import NASBench201API
        except ImportError:
            raise BenchmarkError(f"benchmark.path={path} is an official NAS-Bench-201 file: "
                                 "pip install 'oneshot[nb201]' (nas-bench-201) to read it, or give a CSV") from None  # fmt: skip
        # The API would torch.load the path itself, with the pickle's full powers under older
        # torch (no weights_only): a file a user hands us must never run code. So we unpickle it
        # here, restricted to plain containers, numbers, strings and tensors (what the official
        # file holds: the state dicts of its ArchResults/ResultsCount), and give the API the dict,
        # which it accepts in place of a path (it deep-copies it: twice the file's size at peak).
        import torch

        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable or unsafe file is one line
            raise BenchmarkError(f"benchmark.path={path} is not a NAS-Bench-201 file we can read safely "
                                 f"(plain data only): {_first_line(e):.200}") from None  # fmt: skip
        _check_keys(data, ("meta_archs", "arch2infos", "evaluated_indexes"), path, "NAS-Bench-201")
        return cls(None, path, NASBench201API(data, verbose=False))

    @classmethod
    def _nats(cls, path: Path) -> BenchmarkTable:
        """NATS-Bench's topology search space (its cells are NAS-Bench-201's): one ``.pickle.pbz2``
        file with every cell, or the ``-simple`` directory (``meta.pickle.pbz2`` + one file per
        cell, read when a cell is first looked up), through ``nats_bench``."""
        try:
            import nats_bench
        except ImportError:
            raise BenchmarkError(f"benchmark.path={path} is a NATS-Bench file: pip install 'oneshot[nb201]' "
                                 "(nats_bench) to read it, or give a CSV") from None  # fmt: skip
        data = _plain_pickle(path / NATS_META if path.is_dir() else path, f"benchmark.path={path}")
        keys = ("meta_archs",) if path.is_dir() else ("meta_archs", "arch2infos", "evaluated_indexes")
        _check_keys(data, keys, path, "NATS-Bench topology")
        if path.is_dir():  # the cells' files are read one by one in lookup()
            data = {"meta_archs": data["meta_archs"], "arch2infos": {}, "evaluated_indexes": []}
        api = nats_bench.create(data, "tss", fast_mode=False, verbose=False)
        return cls(None, path, api, archive=path if path.is_dir() else None)

    def _load_nats_cell(self, index: int) -> bool:
        """A ``-simple`` directory's file for cell ``index`` into the API (what its ``reload`` does,
        with our restricted unpickler); False when the directory has no file for it."""
        from nats_bench.api_utils import ArchResults

        for name in (f"{index:06d}.{NATS_EXT}", f"{index}.{NATS_EXT}"):
            if (self.archive / name).is_file():
                data = _plain_pickle(self.archive / name, f"benchmark.path={self.archive} ({name})")
                if not isinstance(data, dict):
                    raise BenchmarkError(f"benchmark.path={self.archive}: {name} is not a NATS-Bench cell file")
                self.api.arch2infos_dict[index] = collections.OrderedDict(
                    (hp, ArchResults.create_from_state_dict(r)) for hp, r in data.items()
                )
                self.api.evaluated_indexes.add(index)
                return True
        return False

    @property
    def columns(self) -> list[str]:
        return list(OFFICIAL) if self.rows is None else list(next(iter(self.rows.values()), {}))

    def lookup(self, genotype) -> dict[str, float] | None:
        arch = str(genotype)
        if self.rows is not None:
            return self.rows.get(arch)
        index = self.api.query_index_by_arch(arch)
        if index < 0:
            return None
        if self.archive is not None and index not in self.api.arch2infos_dict:
            if not self._load_nats_cell(index):
                return None
        out = {}
        for name, (dataset, key) in OFFICIAL.items():
            try:
                info = self.api.get_more_info(index, dataset, hp="200", is_random=False)
            except (KeyError, ValueError):  # this cell was not trained on that dataset
                continue
            value = info.get(key)
            if value is not None and math.isfinite(value):
                out[name] = float(value)
        return out
