"""Issue 11, item 9 (data parts): files that used to load silently short, or fail with a raw numpy
error naming no file, or be decompressed in full before their size was checked, are refused with
a `DataError` that names the file. Every bad file is built in tmp_path."""

from __future__ import annotations

import gzip
import os
import pickle
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

from tolgate_flows.data import DataError
from tolgate_flows.data.cifar10 import CIFAR10_RECORDS_PER_BATCH, load_cifar10
from tolgate_flows.data.mnist import load_mnist, read_idx

ROOT = Path(__file__).resolve().parents[1]
RECORD_BYTES = 3073
CIFAR_NAMES = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]


def write_cifar_binary(folder: Path, per_batch: int = 4) -> Path:
    target = folder / "cifar-10-batches-bin"
    target.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in CIFAR_NAMES:
        labels = rng.integers(0, 10, size=(per_batch, 1), dtype=np.uint8)
        pixels = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        (target / f"{name}.bin").write_bytes(np.concatenate([labels, pixels], axis=1).tobytes())
    return target


def write_cifar_python(folder: Path, labels_of: dict[str, object] | None = None, per_batch: int = 4) -> Path:
    target = folder / "cifar-10-batches-py"
    target.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in CIFAR_NAMES:
        labels = (labels_of or {}).get(name, rng.integers(0, 10, size=per_batch).tolist())
        content = {b"labels": labels, b"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)}
        with open(target / name, "wb") as handle:
            pickle.dump(content, handle, protocol=4)
    return target


def idx_header(dims: tuple[int, ...]) -> bytes:
    return bytes([0, 0, 0x08, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)


# ---------------------------------------------------------------- CIFAR-10 record counts


def test_cifar_binary_truncated_on_a_record_boundary_is_refused_naming_the_file(tmp_path: Path) -> None:
    folder = write_cifar_binary(tmp_path)
    victim = folder / "data_batch_3.bin"
    victim.write_bytes(victim.read_bytes()[:-RECORD_BYTES])  # still a whole number of records
    with pytest.raises(DataError, match=r"data_batch_3\.bin holds 3 records, but the other .* hold 4 .*truncated"):
        load_cifar10(tmp_path)


def test_cifar_test_batch_short_by_whole_records_is_refused_naming_it(tmp_path: Path) -> None:
    folder = write_cifar_binary(tmp_path)
    victim = folder / "test_batch.bin"
    victim.write_bytes(victim.read_bytes()[: 2 * RECORD_BYTES])
    with pytest.raises(DataError, match=r"test_batch\.bin holds 2 records") as info:
        load_cifar10(tmp_path)
    assert "data_batch" not in str(info.value).split(", but")[0]  # only the short file is blamed


def test_cifar_batch_larger_than_10000_records_is_refused_without_reading_it(tmp_path: Path) -> None:
    folder = write_cifar_binary(tmp_path)
    with open(folder / "data_batch_2.bin", "r+b") as handle:  # sparse: nothing is written
        handle.truncate((CIFAR10_RECORDS_PER_BATCH + 1) * RECORD_BYTES)
    with pytest.raises(DataError, match=r"data_batch_2\.bin: \d+ bytes is more than 10000 records"):
        load_cifar10(tmp_path)


def test_cifar_python_batch_shorter_than_its_siblings_is_refused(tmp_path: Path) -> None:
    write_cifar_python(tmp_path)
    target = tmp_path / "cifar-10-batches-py" / "data_batch_5"
    with open(target, "wb") as handle:
        rng = np.random.default_rng(2)
        pickle.dump({b"labels": [1, 2], b"data": rng.integers(0, 256, size=(2, 3072), dtype=np.uint8)}, handle)
    with pytest.raises(DataError, match=r"data_batch_5 holds 2 records, but the other CIFAR-10 batches hold 4"):
        load_cifar10(tmp_path)


# ---------------------------------------------------------------- CIFAR-10 python labels


def _nested(depth: int) -> list:
    value: list = [3]
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (_nested(200), r"'labels' must be a flat list of integers; entry 0 is a list"),
        ([1, [2], 3, 4], r"'labels' must be a flat list of integers; entry 1 is a list"),
        ([1, 2, 2**70, 4], r"labels must lie in \[0, 9\]; entry 2 is 1180591620717411303424"),
        ([1, 2.0, 3, 4], r"'labels' must be a flat list of integers; entry 1 is a float"),
        (b"\x01\x02\x03\x04", r"'labels' must be a list of integers, got bytes"),
        (np.zeros((4, 1), dtype=np.int64), r"'labels' must be a flat sequence, got an array of shape \(4, 1\)"),
    ],
    ids=["deeply-nested", "ragged", "huge-int", "float", "bytes", "2-d-array"],
)
def test_cifar_malformed_python_labels_are_refused_naming_the_file(
    tmp_path: Path, labels: object, message: str
) -> None:
    write_cifar_python(tmp_path, labels_of={"data_batch_4": labels})
    with pytest.raises(DataError, match=r"data_batch_4: " + message):
        load_cifar10(tmp_path)


# ---------------------------------------------------------------- IDX headers


def test_idx_dims_whose_product_wraps_int64_are_refused_naming_the_file(tmp_path: Path) -> None:
    # 2**22 * 2**21 * 2**21 = 2**64 wraps to 0 in int64: the old size check passed on a bare
    # header and numpy's reshape failed with no file named.
    dims = (2**22, 2**21, 2**21)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(idx_header(dims))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: truncated: header promises dims \(4194304, "):
        read_idx(path, 3)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_header((1,)) + bytes(1))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: truncated"):
        load_mnist(tmp_path)


def test_idx_dims_at_the_uint32_limit_are_refused_naming_the_file(tmp_path: Path) -> None:
    dims = (2**32 - 1, 2**32 - 1, 2**32 - 1)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(idx_header(dims) + bytes(100))
    with pytest.raises(DataError, match=rf"t10k-images-idx3-ubyte: truncated: .*i\.e\. {16 + (2**32 - 1) ** 3} bytes"):
        read_idx(path, 3)


def test_gzipped_idx_header_promising_more_than_deflate_can_hold_is_refused_before_decompressing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_header((2**31,)) + bytes(10)))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: .*more than a \d+-byte gzip file can hold"):
        read_idx(path, 1)


# ---------------------------------------------------------------- streamed .gz


def _gzip_stream(path: Path, header: bytes, zero_bytes: int) -> None:
    """A gzip file of ``header`` and ``zero_bytes`` zeros, compressed chunk by chunk."""
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: gzip container
    chunk = bytes(1 << 20)
    parts = [compressor.compress(header)]
    for start in range(0, zero_bytes, len(chunk)):
        parts.append(compressor.compress(chunk[: min(len(chunk), zero_bytes - start)]))
    parts.append(compressor.flush())
    path.write_bytes(b"".join(parts))


class _CountingOpen:
    """Stands in for ``gzip.open``: counts the decompressed bytes handed to the reader."""

    def __init__(self) -> None:
        self.delivered = 0
        self._real_open = gzip.open

    def __call__(self, path: Path, mode: str = "rb") -> object:
        counter, stream = self, self._real_open(path, mode)

        class Counted:
            def __enter__(self) -> Counted:
                return self

            def __exit__(self, *exc: object) -> None:
                stream.close()

            def read(self, size: int = -1) -> bytes:
                data = stream.read(size)
                counter.delivered += len(data)
                return data

            def readinto(self, buffer: memoryview) -> int:
                got = stream.readinto(buffer)
                counter.delivered += got
                return got

        return Counted()


def test_oversize_gz_is_refused_without_decompressing_it_all(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    _gzip_stream(path, idx_header((12,)), zero_bytes=64 << 20)  # promises 12 bytes, holds 64 MiB
    counting = _CountingOpen()
    monkeypatch.setattr(gzip, "open", counting)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: has trailing bytes: header promises dims"):
        read_idx(path, 1)
    assert counting.delivered <= 4 + 4 + 12 + 1  # header, promised values, one byte to see there is more


def test_gz_shorter_than_its_header_promises_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_header((12,)) + bytes(7)))
    with pytest.raises(
        DataError,
        match=r"\.gz: truncated: header promises dims \(12,\), i\.e\. 20 bytes, the "
        r"decompressed data has 15",
    ):
        read_idx(path, 1)


def test_gz_with_a_wrong_magic_is_refused_from_its_first_bytes(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "train-images-idx3-ubyte.gz"
    _gzip_stream(path, b"\x00\x00\x08\x01", zero_bytes=8 << 20)
    counting = _CountingOpen()
    monkeypatch.setattr(gzip, "open", counting)
    with pytest.raises(DataError, match=r"magic number 0x00000801, expected 0x00000803"):
        read_idx(path, 3)
    assert counting.delivered == 4


def test_valid_gz_still_reads_back_exactly(tmp_path: Path) -> None:
    values = np.arange(2 * 28 * 28, dtype=np.uint64).astype(np.uint8).reshape(2, 28, 28)
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_header(values.shape) + values.tobytes()))
    assert np.array_equal(read_idx(path, 3), values)


# ---------------------------------------------------------------- python -O


def test_record_count_and_header_checks_hold_under_python_optimize(tmp_path: Path) -> None:
    folder = write_cifar_binary(tmp_path / "cifar")
    victim = folder / "data_batch_1.bin"
    victim.write_bytes(victim.read_bytes()[:-RECORD_BYTES])
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "images").write_bytes(idx_header((2**22, 2**21, 2**21)))
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from tolgate_flows.data import DataError
        from tolgate_flows.data.cifar10 import load_cifar10
        from tolgate_flows.data.mnist import read_idx
        assert False, "asserts must be stripped here"
        for name, call in (("cifar", lambda: load_cifar10({str(tmp_path / "cifar")!r})),
                           ("idx", lambda: read_idx(Path({str(tmp_path / "idx" / "images")!r}), 3))):
            try:
                call()
            except DataError as exc:
                print(name, "refused:", exc)
                continue
            raise SystemExit(f"{{name}}: no DataError under -O")
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-O", "-c", script], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert "cifar refused:" in done.stdout and "data_batch_1.bin holds 3 records" in done.stdout
    assert (
        "idx refused:" in done.stdout and "truncated: header promises dims (4194304, 2097152, 2097152)" in done.stdout
    )
