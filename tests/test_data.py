"""Loaders read the real file formats back exactly and refuse bad files; batches, spirals and the
mixture are deterministic by seed and follow their formulas."""

from __future__ import annotations

import gzip
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import integrate

from tolgate_flows.data import (
    CLOCKWISE,
    COUNTER_CLOCKWISE,
    THREE_GAUSSIANS,
    DataError,
    DataNotFoundError,
    GaussianMixture1D,
    ImageSplit,
    bits_per_dim,
    load_dataset,
    make_batches,
    make_spiral_splits,
    make_spirals,
)
from tolgate_flows.data.cifar10 import load_cifar10
from tolgate_flows.data.mnist import load_mnist
from tolgate_flows.data.spirals import spiral_points

# ----------------------------------------------------------------------------- CIFAR-10 files

CIFAR_TRAIN_NAMES = [f"data_batch_{i}" for i in range(1, 6)]
PER_BATCH = 4


def fake_cifar(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (pixels (N, 3072) uint8, labels (N,) int64) for the five training and the test batch."""
    rng = np.random.default_rng(seed)
    return {
        name: (
            rng.integers(0, 256, size=(PER_BATCH, 3072), dtype=np.uint8),
            rng.integers(0, 10, size=PER_BATCH).astype(np.int64),
        )
        for name in [*CIFAR_TRAIN_NAMES, "test_batch"]
    }


def write_cifar_binary(folder: Path, batches: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    target = folder / "cifar-10-batches-bin"
    target.mkdir(parents=True)
    for name, (pixels, labels) in batches.items():
        records = np.concatenate([labels.astype(np.uint8)[:, None], pixels], axis=1)
        (target / f"{name}.bin").write_bytes(records.tobytes())
    return target


def write_cifar_python(folder: Path, batches: dict[str, tuple[np.ndarray, np.ndarray]], protocol: int) -> Path:
    target = folder / "cifar-10-batches-py"
    target.mkdir(parents=True)
    for name, (pixels, labels) in batches.items():
        content = {
            b"batch_label": name.encode(),
            b"labels": labels.tolist(),
            b"data": pixels,
            b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
        }
        with open(target / name, "wb") as handle:
            pickle.dump(content, handle, protocol=protocol)
    return target


def expected_split(batches: dict[str, tuple[np.ndarray, np.ndarray]], names: list[str]) -> ImageSplit:
    pixels = np.concatenate([batches[n][0] for n in names]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([batches[n][1] for n in names])
    return ImageSplit(torch.from_numpy(pixels), torch.from_numpy(labels))


def assert_same_split(actual: ImageSplit, expected: ImageSplit) -> None:
    assert actual.images.dtype == torch.uint8 and actual.labels.dtype == torch.int64
    assert torch.equal(actual.images, expected.images)
    assert torch.equal(actual.labels, expected.labels)


@pytest.mark.parametrize("fmt", ["bin", "py-protocol2", "py-protocol5"])
def test_cifar_files_read_back_exactly(tmp_path: Path, fmt: str) -> None:
    batches = fake_cifar(seed=1)
    if fmt == "bin":
        write_cifar_binary(tmp_path, batches)
    else:
        write_cifar_python(tmp_path, batches, protocol=int(fmt[-1]))
    train, test, _ = load_cifar10(tmp_path)
    assert_same_split(train, expected_split(batches, CIFAR_TRAIN_NAMES))
    assert_same_split(test, expected_split(batches, ["test_batch"]))


def test_cifar_dataset_carves_validation_from_train(tmp_path: Path) -> None:
    batches = fake_cifar(seed=2)
    write_cifar_binary(tmp_path, batches)
    data = load_dataset("cifar10", tmp_path, split_seed=3, val_fraction=0.25)
    assert (len(data.train), len(data.val), len(data.test)) == (15, 5, 4)
    assert data.levels == 256 and data.n_classes == 10 and data.image_shape == (3, 32, 32)
    assert data.flip_symmetric and data.dims == 3072
    full = expected_split(batches, CIFAR_TRAIN_NAMES)
    # Random pixels make every image unique, so rows identify images.
    rows = {img.numpy().tobytes(): int(lab) for img, lab in zip(full.images, full.labels, strict=True)}
    seen = [img.numpy().tobytes() for img in torch.cat([data.train.images, data.val.images])]
    assert sorted(seen) == sorted(rows)
    for part in (data.train, data.val):
        for image, label in zip(part.images, part.labels, strict=True):
            assert rows[image.numpy().tobytes()] == int(label)


def test_python_batch_written_by_numpy1_or_python2_is_accepted(tmp_path: Path) -> None:
    # The official batches name `numpy.core.multiarray._reconstruct`; numpy 2 writes `numpy._core`.
    batches = fake_cifar(seed=3)
    folder = write_cifar_python(tmp_path, batches, protocol=2)
    for name in batches:
        raw = (folder / name).read_bytes()
        if b"numpy._core" in raw:
            (folder / name).write_bytes(raw.replace(b"numpy._core", b"numpy.core"))
    train, _, _ = load_cifar10(tmp_path)
    assert_same_split(train, expected_split(batches, CIFAR_TRAIN_NAMES))


def test_truncated_cifar_binary_is_refused(tmp_path: Path) -> None:
    folder = write_cifar_binary(tmp_path, fake_cifar(seed=4))
    victim = folder / "data_batch_3.bin"
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"data_batch_3\.bin.*truncated"):
        load_cifar10(tmp_path)


def test_out_of_range_cifar_label_is_refused(tmp_path: Path) -> None:
    batches = fake_cifar(seed=5)
    batches["test_batch"][1][0] = 10
    write_cifar_binary(tmp_path, batches)
    with pytest.raises(DataError, match=r"test_batch\.bin.*labels must lie in \[0, 9\]"):
        load_cifar10(tmp_path)


class Payload:
    """An arbitrary object whose unpickling runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (os.system, (f"touch {self.marker}",))


class Harmless:
    """A plain class instance: still not something a CIFAR batch may hold."""


@pytest.mark.parametrize("kind", ["os.system", "class instance"])
def test_pickle_with_arbitrary_object_is_refused(tmp_path: Path, kind: str) -> None:
    batches = fake_cifar(seed=6)
    folder = write_cifar_python(tmp_path, batches, protocol=4)
    marker = tmp_path / "pwned"
    evil = Payload(marker) if kind == "os.system" else Harmless()
    with open(folder / "data_batch_2", "wb") as handle:
        pickle.dump({b"data": batches["data_batch_2"][0], b"labels": [0] * PER_BATCH, b"x": evil}, handle)
    expected = "system" if kind == "os.system" else "Harmless"
    with pytest.raises(DataError, match=rf"data_batch_2: refusing to unpickle global .*{expected}"):
        load_cifar10(tmp_path)
    assert not marker.exists()


def test_python_batch_with_wrong_data_shape_is_refused(tmp_path: Path) -> None:
    batches = fake_cifar(seed=7)
    folder = write_cifar_python(tmp_path, batches, protocol=5)
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, handle)
    with pytest.raises(DataError, match=r"test_batch: 'data' must be a uint8 array of shape \(N, 3072\)"):
        load_cifar10(tmp_path)


def test_missing_cifar_folder_says_where_to_put_files(tmp_path: Path) -> None:
    for data_dir in (tmp_path / "nowhere", None):
        with pytest.raises(DataNotFoundError, match=r"never downloaded.*batches-bin/data_batch_1\.bin"):
            load_dataset("cifar10", data_dir)


def test_missing_cifar_batch_is_named(tmp_path: Path) -> None:
    folder = write_cifar_binary(tmp_path, fake_cifar(seed=8))
    (folder / "data_batch_4.bin").unlink()
    with pytest.raises(DataNotFoundError, match=r"data_batch_4\.bin"):
        load_cifar10(tmp_path)


# ----------------------------------------------------------------------------- MNIST files

MNIST_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(values: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, values.ndim]) + b"".join(d.to_bytes(4, "big") for d in values.shape)
    return header + values.astype(np.uint8).tobytes()


def write_mnist(folder: Path, gz: bool, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    content = {}
    for split, count in (("train", 12), ("test", 5)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count, dtype=np.uint8)
        content[split] = (images, labels)
        for name, values in zip(MNIST_NAMES[split], (images, labels), strict=True):
            raw = idx_bytes(values)
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:
                (folder / name).write_bytes(raw)
    return content


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files_read_back_exactly(tmp_path: Path, gz: bool) -> None:
    content = write_mnist(tmp_path, gz)
    train, test, _ = load_mnist(tmp_path)
    for split, actual in (("train", train), ("test", test)):
        images, labels = content[split]
        assert_same_split(
            actual, ImageSplit(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
        )
    data = load_dataset("mnist", tmp_path, val_fraction=0.25)
    assert (len(data.train), len(data.val), len(data.test)) == (9, 3, 5)
    assert data.image_shape == (1, 28, 28) and not data.flip_symmetric


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: b"\x00\x00\x08\x01" + raw[4:], r"magic number 0x00000801, expected 0x00000803"),
        (lambda raw: raw[:-10], r"truncated: header promises dims \(12, 28, 28\)"),
        (lambda raw: raw + b"\x00", r"has trailing bytes"),
        (lambda raw: raw[:9], r"truncated inside the IDX header"),
    ],
)
def test_damaged_mnist_images_are_refused(tmp_path: Path, damage, message: str) -> None:
    write_mnist(tmp_path, gz=False)
    victim = tmp_path / "train-images-idx3-ubyte"
    victim.write_bytes(damage(victim.read_bytes()))
    with pytest.raises(DataError, match=rf"train-images-idx3-ubyte: .*{message}"):
        load_mnist(tmp_path)


def test_mnist_count_mismatch_and_bad_size_are_refused(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte holds 4 labels but .* holds 5 images"):
        load_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(5, np.uint8)))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((5, 32, 32), np.uint8)))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: images must be 28x28, got 32x32"):
        load_mnist(tmp_path)


def test_corrupt_gzip_and_missing_mnist_file_are_named(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=True)
    victim = tmp_path / "train-labels-idx1-ubyte.gz"
    victim.write_bytes(victim.read_bytes()[:-8])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: not a readable gzip file"):
        load_mnist(tmp_path)
    victim.unlink()
    with pytest.raises(DataNotFoundError, match=r"train-labels-idx1-ubyte .*never downloaded"):
        load_mnist(tmp_path)


# ----------------------------------------------------------------------------- digits and batches


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def rows(split: ImageSplit) -> list[bytes]:
    pairs = zip(split.images, split.labels, strict=True)
    return [image.numpy().tobytes() + bytes([int(label)]) for image, label in pairs]


def test_digits_split_is_fixed_and_a_partition(digits) -> None:
    from sklearn.datasets import load_digits

    assert (len(digits.train), len(digits.val), len(digits.test)) == (1294, 144, 359)
    assert digits.levels == 17 and digits.image_shape == (1, 8, 8) and not digits.flip_symmetric
    bunch = load_digits()
    original = ImageSplit(
        torch.from_numpy(bunch.images.astype(np.uint8)).unsqueeze(1), torch.from_numpy(bunch.target.astype(np.int64))
    )
    # As multisets, train + val + test is the whole set: the three splits partition it.
    assert sorted(rows(digits.train) + rows(digits.val) + rows(digits.test)) == sorted(rows(original))
    again = load_dataset("digits")
    other_seed = load_dataset("digits", split_seed=1)
    for name in ("train", "val", "test"):
        assert_same_split(again.split(name), digits.split(name))
    assert_same_split(other_seed.test, digits.test)
    assert not torch.equal(other_seed.val.labels, digits.val.labels)


def test_dequantized_batches_are_in_range_and_recover_pixels(digits) -> None:
    batches = make_batches(digits, "train", 100, seed=0)
    assert len(batches) == 1294 // 100
    seen, offsets = [], []
    for batch in batches.epoch(0):
        assert batch.x.dtype == torch.float32 and batch.x.shape == (100, 1, 8, 8)
        assert float(batch.x.min()) >= 0.0 and float(batch.x.max()) <= 1.0
        pixels = digits.train.images[batch.index].to(torch.float32)
        offsets.append((batch.x * 17 - pixels).flatten())  # the noise u; no flips for digits
        assert torch.equal(batch.y, digits.train.labels[batch.index])
        seen.append(batch.index)
    noise = torch.cat(offsets)
    # u ~ U[0, 1): inside the pixel's bin (up to float32 rounding at the edges), mean 1/2, std 1/sqrt(12).
    assert float(noise.min()) > -1e-5 and float(noise.max()) < 1 + 1e-5
    assert abs(float(noise.mean()) - 0.5) < 0.01 and abs(float(noise.std()) - 12**-0.5) < 0.01
    indices = torch.cat(seen)
    assert len(set(indices.tolist())) == len(indices) == 1200


def test_batches_are_determined_by_seed_epoch_and_position(digits) -> None:
    def epoch(seed: int, e: int, start: int = 0) -> list:
        return list(make_batches(digits, "train", 128, seed=seed).epoch(e, start_batch=start))

    first, repeat = epoch(5, 0), epoch(5, 0)
    for a, b in zip(first, repeat, strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.index, b.index)
    assert not torch.equal(epoch(6, 0)[0].index, first[0].index)
    assert not torch.equal(epoch(5, 1)[0].index, first[0].index)
    resumed = epoch(5, 0, start=3)
    assert all(torch.equal(a.x, b.x) for a, b in zip(first[3:], resumed, strict=True))
    # Global RNG use in between changes nothing.
    torch.rand(10)
    np.random.rand(10)
    assert torch.equal(epoch(5, 0)[0].x, first[0].x)


def test_ddp_shards_concatenate_to_the_single_process_batch(digits) -> None:
    single = list(make_batches(digits, "val", 50, seed=1).epoch(0))
    shards = [list(make_batches(digits, "val", 50, seed=1, rank=r, world_size=3).epoch(0)) for r in range(3)]
    assert all(len(s) == len(single) == 3 for s in shards)
    for i, whole in enumerate(single):
        assert torch.equal(torch.cat([s[i].x for s in shards]), whole.x)
        assert torch.equal(torch.cat([s[i].y for s in shards]), whole.y)


def test_flips_mirror_some_training_images_and_never_evaluation_ones(digits) -> None:
    batch = next(make_batches(digits, "train", 256, seed=2, flip=True).epoch(0))
    pixels = digits.train.images[batch.index].to(torch.float32)
    recovered = torch.floor(batch.x * 17)
    plain = (recovered == pixels).flatten(1).all(1)
    mirrored = (recovered == pixels.flip(-1)).flatten(1).all(1)
    assert bool((plain | mirrored).all())
    assert 50 < int((mirrored & ~plain).sum()) < 206  # about half of 256, and never all or none
    test_batch = next(make_batches(digits, "test", 512, seed=2).epoch(0))
    assert test_batch.x.shape[0] == 359 and torch.equal(test_batch.index, torch.arange(359))
    with pytest.raises(ValueError, match="flips are a training augmentation"):
        make_batches(digits, "test", 10, seed=0, flip=True)


def test_bits_per_dim_of_the_uniform_density() -> None:
    # log p(x) = 0 on [0, 1]^D is a uniform distribution over the levels^D pixel values: log2(levels) bits.
    assert torch.allclose(bits_per_dim(torch.zeros(3), dims=3072, levels=256), torch.full((3,), 8.0))
    log_px = torch.tensor([-100.0])
    expected = -(-100.0 - 64 * math.log(17)) / (64 * math.log(2))
    assert math.isclose(float(bits_per_dim(log_px, dims=64, levels=17)), expected, rel_tol=1e-6)


# ----------------------------------------------------------------------------- spirals


@pytest.fixture(scope="module")
def spirals():
    return make_spirals(n=400, seed=11)


def test_spiral_shapes_labels_and_balance(spirals) -> None:
    assert spirals.observations.shape == spirals.truth.shape == spirals.truth_next.shape == (400, 200, 2)
    assert spirals.times.shape == (400,) and spirals.start_times.shape == (400,)
    assert spirals.labels.shape == (400, 3) and spirals.direction.dtype == torch.int64
    assert int((spirals.direction == CLOCKWISE).sum()) == 200
    assert int((spirals.direction == COUNTER_CLOCKWISE).sum()) == 200
    assert torch.equal(spirals.labels[:, 2], spirals.direction.to(torch.float32))
    step = 6 * math.pi / 999
    assert torch.allclose(spirals.times, torch.arange(400) * step)
    assert float(spirals.start_times.max()) <= 600 * step + 1e-5  # the following window still fits


def test_spiral_parameters_and_noise_have_the_stated_moments() -> None:
    data = make_spirals(seed=3)  # paper size: 5000 spirals
    assert abs(float(data.a.mean()) - 1.0) < 0.01 and abs(float(data.a.std()) - 0.08) < 0.005
    assert abs(float(data.b.mean()) - 0.25) < 0.003 and abs(float(data.b.std()) - 0.03) < 0.002
    assert abs(float((data.observations - data.truth).std()) - 0.3) < 0.003


def test_spirals_are_deterministic_by_seed() -> None:
    first, again = make_spirals(n=50, seed=4), make_spirals(n=50, seed=4)
    assert all(torch.equal(getattr(first, f), getattr(again, f)) for f in ("observations", "truth_next", "a"))
    train, test = make_spiral_splits(n=50)
    assert not torch.equal(train.observations, test.observations)
    with pytest.raises(ValueError, match="seeds must differ"):
        make_spiral_splits(train_seed=2, test_seed=2, n=50)


def test_spiral_formulas_against_hand_computed_points(spirals) -> None:
    t_max = 6 * math.pi
    # Clockwise, a = 1, b = 0.25, t = 2: theta = 6 pi + 1 - 2, R = 1 + 0.25 * 50 / theta.
    theta = 6 * math.pi - 1
    radius = 1 + 12.5 / theta
    clockwise = spiral_points(np.array([[2.0]]), np.array([1.0]), np.array([0.25]), np.array([CLOCKWISE]), t_max)
    assert np.allclose(clockwise[0, 0], [radius * math.cos(theta) - 5, radius * math.sin(theta)])
    # theta = -1 (mod 2 pi), so the point is (R cos 1 - 5, -R sin 1) = (-4.08132, -1.43075).
    assert np.allclose(clockwise[0, 0], [radius * math.cos(1.0) - 5, -radius * math.sin(1.0)])
    assert np.allclose(clockwise[0, 0], [-4.08132, -1.43075], atol=1e-5)
    # Counter-clockwise, a = 1.1, b = 0.2, t = 3: R = 1.1 + 0.6 = 1.7.
    ccw = spiral_points(np.array([[3.0]]), np.array([1.1]), np.array([0.2]), np.array([COUNTER_CLOCKWISE]), t_max)
    assert np.allclose(ccw[0, 0], [1.7 * math.cos(3.0) + 5, 1.7 * math.sin(3.0)])
    # The generated windows follow the same formulas at their own times.
    for i in (0, 1, 2, 3):
        a, b, d = float(spirals.a[i]), float(spirals.b[i]), int(spirals.direction[i])
        for k, target in ((17, spirals.truth[i, 17]), (200 + 5, spirals.truth_next[i, 5])):
            t = float(spirals.start_times[i] + spirals.times[k])
            angle = t_max + 1 - t if d == CLOCKWISE else t
            r = a + b * 50 / angle if d == CLOCKWISE else a + b * angle
            centre = -5 if d == CLOCKWISE else 5
            assert torch.allclose(target, torch.tensor([r * math.cos(angle) + centre, r * math.sin(angle)]), atol=1e-4)


def test_clockwise_spirals_turn_clockwise(spirals) -> None:
    for direction, sign in ((CLOCKWISE, -1.0), (COUNTER_CLOCKWISE, 1.0)):
        chosen = spirals.truth[spirals.direction == direction]
        centre = torch.tensor([-5.0 if direction == CLOCKWISE else 5.0, 0.0])
        rel = chosen - centre
        # z-component of r x v: negative for clockwise motion.
        position, velocity = rel[:, :-1], rel[:, 1:] - rel[:, :-1]
        cross = position[..., 0] * velocity[..., 1] - position[..., 1] * velocity[..., 0]
        assert bool((sign * cross > 0).all())


# ----------------------------------------------------------------------------- 1-D mixture


def test_mixture_density_integrates_to_one_and_matches_its_formula() -> None:
    def density(x: float) -> float:
        return float(THREE_GAUSSIANS.density(torch.tensor(x, dtype=torch.float64)))

    total, _ = integrate.quad(density, -np.inf, np.inf, points=None, limit=200)
    assert abs(total - 1.0) < 1e-8
    x = 0.7
    by_hand = sum(
        w * math.exp(-0.5 * ((x - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))
        for w, m, s in zip((0.3, 0.4, 0.3), (-2.0, 0.0, 2.5), (0.5, 0.4, 0.6), strict=True)
    )
    assert math.isclose(density(x), by_hand, rel_tol=1e-12)


def test_mixture_samples_follow_the_mixture_and_the_seed() -> None:
    samples = THREE_GAUSSIANS.sample(20000, 0)
    assert samples.shape == (20000, 1) and samples.dtype == torch.float32
    assert torch.equal(samples, THREE_GAUSSIANS.sample(20000, 0))
    assert not torch.equal(samples, THREE_GAUSSIANS.sample(20000, 1))
    stream = torch.Generator().manual_seed(0)
    assert torch.equal(THREE_GAUSSIANS.sample(20000, stream), samples)
    assert not torch.equal(THREE_GAUSSIANS.sample(20000, stream), samples)  # the generator advanced
    mean = 0.3 * -2.0 + 0.4 * 0.0 + 0.3 * 2.5
    assert abs(float(samples.mean()) - mean) < 0.05
    # Mass left of -1 is essentially the first component's 0.3.
    assert abs(float((samples < -1).float().mean()) - 0.3) < 0.015
    with pytest.raises(ValueError, match="sum to 1"):
        GaussianMixture1D(weights=(0.5, 0.6), means=(0.0, 1.0), stds=(1.0, 1.0))
