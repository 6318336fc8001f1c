"""Reading the official CIFAR-10 python batches without executing arbitrary code.

A pickle is a program: `pickle.load` will call any importable callable the file names (the classic
`os.system` payload). The CIFAR-10 python batches need only dicts, lists, bytes, strings, ints and
numpy arrays, so the unpickler below resolves exactly the globals that numpy array reconstruction
uses and refuses every other one before anything is called.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any

from .errors import DataError

# (module, name) pairs that pickled numpy arrays, dtypes and scalars refer to, written with the
# numpy >= 2 module names; files written by numpy 1.x (and by Python 2, as the official batches
# were) say `numpy.core` instead and are mapped onto these by `_canonical_module`.
_ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy._core.multiarray", "_reconstruct"),  # ndarray.__reduce__, protocols 0-4
        ("numpy._core.multiarray", "scalar"),  # numpy scalars, e.g. an np.int64 label
        ("numpy._core.numeric", "_frombuffer"),  # ndarray.__reduce_ex__, protocol 5
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # Protocols 0-2 written by Python 3 store `bytes` as _codecs.encode(str, "latin1").
        ("_codecs", "encode"),
    }
)


def _canonical_module(module: str) -> str:
    if module == "numpy.core" or module.startswith("numpy.core."):
        return "numpy._core" + module[len("numpy.core") :]
    return module


def _import_module(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        # numpy 1.x has no `numpy._core`; its private modules live under `numpy.core`.
        if module.startswith("numpy._core"):
            return importlib.import_module("numpy.core" + module[len("numpy._core") :])
        raise


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only containers, scalars, strings, bytes and numpy arrays."""

    def __init__(self, file: Any, *, source: Path) -> None:
        # encoding="bytes": the official batches were pickled by Python 2, whose `str` holds raw
        # bytes (the array buffers among them); keys then come back as b"data", b"labels".
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        canonical = _canonical_module(module)
        if (canonical, name) not in _ALLOWED_GLOBALS:
            raise DataError(
                f"{self._source}: refusing to unpickle global {module}.{name}; a CIFAR-10 python batch "
                "holds only dicts, lists, bytes, strings and numpy arrays, so this file is not one "
                "(or has been tampered with)"
            )
        return getattr(_import_module(canonical), name)


def load_restricted_pickle(path: Path) -> Any:
    """Unpickle `path` with `RestrictedUnpickler`; every failure becomes a `DataError` naming the file."""
    try:
        with open(path, "rb") as handle:
            return RestrictedUnpickler(handle, source=path).load()
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DataError(f"{path}: not a readable pickle (truncated or corrupt): {exc!r}") from exc
