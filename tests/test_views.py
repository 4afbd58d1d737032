"""Views and input pipeline: alignment, normalisation, determinism, cache, unreadable files.

The main fixture is a dataset whose pixels encode their own coordinates (terrain R, G = x, y;
height = y * SIZE + x; segmentation class a function of x, y; terrain B = sample number), so a
view tells which image pixels it came from and the tests can check alignment exactly.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from cmc_kit import cache as shard_cache
from cmc_kit import decode, views
from cmc_kit.errors import DataError
from cmc_kit.palette import NUM_CLASSES, PALETTE, nearest_class

SIZE = 48          # image side
N_SAMPLES = 7
ALL_VIEWS = ("terrain", "segmentation", "height", "overview")


# -- naive references (NumPy only) ------------------------------------------------------------

def coordinate_class(x, y):
    return (x // 5 + 2 * (y // 7)) % NUM_CLASSES


def coordinate_images(sample: int):
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    terrain = np.stack([x, y, np.full_like(x, sample)], axis=-1).astype(np.uint8)
    height = (y * SIZE + x).astype(np.uint16)
    segmentation = PALETTE[coordinate_class(x, y)]
    return terrain, height, segmentation


def terrain_coordinates(terrain_view):
    """Inverts x/127.5 - 1: float view [h, w, 3] -> (x, y, sample) int arrays."""
    values = np.round((terrain_view + 1.0) * 127.5).astype(np.int64)
    return values[..., 0], values[..., 1], values[..., 2]


def height_values(height_view):
    return np.round((height_view[..., 0] + 1.0) * 32767.5).astype(np.int64)


def dihedral_transforms():
    """The 8 flips/rotations of a square array (applied to axes 0, 1)."""
    return [lambda a, f=flip, k=k: np.rot90(a[:, ::-1] if f else a, k)
            for flip in (False, True) for k in range(4)]


def write_sample(folder, sample_id, terrain, height, segmentation):
    paths = {"terrain": folder / f"{sample_id}_t.png", "height": folder / f"{sample_id}_h.png",
             "segmentation": folder / f"{sample_id}_i2.png"}
    Image.fromarray(terrain).save(paths["terrain"])
    Image.fromarray(height).save(paths["height"])  # uint16 -> mode "I;16", a 16-bit PNG
    Image.fromarray(segmentation).save(paths["segmentation"])
    return {"id": sample_id, **{k: str(v) for k, v in paths.items()}}


def batches(dataset):
    return [{k: v.numpy() for k, v in batch.items()} for batch in dataset]


def assert_same_batches(left, right):
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope="module")
def coordinate_catalog(tmp_path_factory):
    folder = tmp_path_factory.mktemp("coordinates") / "_dataset"
    folder.mkdir()
    rows = [write_sample(folder, f"{i:04d}", *coordinate_images(i)) for i in range(N_SAMPLES)]
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def cache_dir(coordinate_catalog, tmp_path_factory):
    return shard_cache.prepare_cache(coordinate_catalog, tmp_path_factory.mktemp("cache"),
                               shard_size=3, progress=False)


@pytest.fixture
def catalog_copy(coordinate_catalog, tmp_path):
    """A private copy of the coordinate dataset that a test may damage."""
    rows = []
    for row in coordinate_catalog.to_dict("records"):
        copied = {"id": row["id"]}
        for column in decode.SOURCES:
            target = tmp_path / "_dataset" / f"{row['id']}_{column}.png"
            target.parent.mkdir(exist_ok=True)
            shutil.copy(row[column], target)
            copied[column] = str(target)
        rows.append(copied)
    return pd.DataFrame(rows)


# -- decoding ---------------------------------------------------------------------------------

def test_sixteen_bit_height_png_round_trips_exactly(tmp_path):
    height = np.random.default_rng(0).integers(0, 65536, size=(9, 11), dtype=np.uint16)
    Image.fromarray(height).save(tmp_path / "h.png")
    raw = decode.decode_sample(height=str(tmp_path / "h.png"))
    assert set(raw) == {"height"}
    assert raw["height"].dtype == tf.uint16 and raw["height"].shape == (9, 11, 1)
    np.testing.assert_array_equal(raw["height"].numpy()[..., 0], height)


def test_decode_sample_decodes_only_given_paths(coordinate_catalog):
    row = coordinate_catalog.iloc[2]
    raw = decode.decode_sample(terrain=row["terrain"], segmentation=row["segmentation"])
    assert set(raw) == {"terrain", "segmentation"}
    terrain, _, segmentation = coordinate_images(2)
    np.testing.assert_array_equal(raw["terrain"].numpy(), terrain)
    np.testing.assert_array_equal(raw["segmentation"].numpy()[..., 0], nearest_class(segmentation))
    with pytest.raises(ValueError, match="at least one"):
        decode.decode_sample()


def test_nearest_palette_class_matches_numpy_on_off_palette_colours():
    rng = np.random.default_rng(1)
    noisy = PALETTE[rng.integers(0, NUM_CLASSES, 3996)].astype(int) + rng.integers(-60, 61, (3996, 3))
    # Colours exactly halfway between two palette colours must go to the lower class id.
    candidates = rng.integers(0, 256, (400_000, 3)).astype(np.int32)
    distances = np.sort(((candidates[:, None] - PALETTE.astype(np.int32)) ** 2).sum(-1), axis=1)
    ties = candidates[distances[:, 0] == distances[:, 1]][:100]
    assert len(ties) > 20
    colours = np.concatenate([np.clip(noisy, 0, 255), rng.integers(0, 256, (3997, 3)), PALETTE])
    colours = np.concatenate([colours, ties]).astype(np.uint8).reshape(1, -1, 3)
    got = decode.nearest_palette_class(tf.constant(colours)).numpy()
    np.testing.assert_array_equal(got, nearest_class(colours))
    assert got.dtype == np.uint8


# -- views ------------------------------------------------------------------------------------

def test_view_specs_give_channels_and_ranges(coordinate_catalog):
    ds = views.make_dataset(coordinate_catalog, views=ALL_VIEWS, crop_size=16, batch_size=3,
                            training=True, seed=0)
    batch = next(iter(ds))
    for name in ALL_VIEWS:
        assert batch[name].dtype == tf.float32
        assert batch[name].shape == (3, 16, 16, views.VIEW_SPECS[name].channels)
        assert -1.0 <= float(tf.reduce_min(batch[name])) and float(tf.reduce_max(batch[name])) <= 1.0
    one_hot = batch["segmentation"].numpy()
    assert set(np.unique(one_hot)) <= {0.0, 1.0}
    np.testing.assert_array_equal(one_hot.sum(-1), 1.0)
    assert {views.VIEW_SPECS[v].channels for v in ("terrain", "overview")} == {3}
    assert (views.VIEW_SPECS["segmentation"].channels, views.VIEW_SPECS["height"].channels) == (7, 1)


def test_normalisations_hit_known_values():
    np.testing.assert_allclose(views.normalise_terrain(tf.constant([0, 255], tf.uint8)), [-1, 1])
    np.testing.assert_allclose(views.normalise_height(tf.constant([0, 65535], tf.uint16)), [-1, 1])
    np.testing.assert_array_equal(
        views.one_hot_classes(tf.constant([[2], [6]], tf.uint8)),
        np.eye(NUM_CLASSES, dtype=np.float32)[[2, 6]])


def test_crop_views_share_one_pixel_aligned_window(coordinate_catalog):
    windows = set()
    for epoch in range(3):
        ds = views.make_dataset(coordinate_catalog, views=ALL_VIEWS[:3], crop_size=16,
                                batch_size=3, training=True, seed=4, epoch=epoch)
        for batch in batches(ds):
            for terrain, height, segmentation in zip(batch["terrain"], batch["height"],
                                                     batch["segmentation"]):
                x, y, _ = terrain_coordinates(terrain)
                top, left = int(y[0, 0]), int(x[0, 0])
                rows, cols = np.mgrid[0:16, 0:16]
                np.testing.assert_array_equal(x, left + cols)  # one contiguous window
                np.testing.assert_array_equal(y, top + rows)
                np.testing.assert_array_equal(height_values(height), y * SIZE + x)
                np.testing.assert_array_equal(segmentation.argmax(-1), coordinate_class(x, y))
                windows.add((top, left))
    assert len(windows) > 5  # random windows, not a fixed one
    assert all(0 <= top <= SIZE - 16 and 0 <= left <= SIZE - 16 for top, left in windows)


def test_any_subset_of_views(coordinate_catalog):
    ds = views.make_dataset(coordinate_catalog[["id", "terrain", "height"]],
                            views=("terrain", "height"), crop_size=16, batch_size=2,
                            training=True, seed=0)
    batch = next(iter(ds))
    assert set(batch) == {"terrain", "height"}
    x, y, _ = terrain_coordinates(batch["terrain"][0].numpy())
    np.testing.assert_array_equal(height_values(batch["height"][0].numpy()), y * SIZE + x)


def test_segmentation_one_hot_is_nearest_palette_of_noisy_png(tmp_path):
    rng = np.random.default_rng(3)
    rows = []
    for i in range(3):
        classes = rng.integers(0, NUM_CLASSES, (SIZE, SIZE))
        rgb = PALETTE[classes].astype(int) + rng.integers(-50, 51, (SIZE, SIZE, 3))
        rgb[:8] = rng.integers(0, 256, (8, SIZE, 3))  # some far-off colours too
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)
        rows.append(write_sample(tmp_path, f"{i:04d}", rgb, np.zeros((SIZE, SIZE), np.uint16), rgb))
    catalog = pd.DataFrame(rows)
    ds = views.make_dataset(catalog, views=("segmentation",), crop_size=SIZE, batch_size=3,
                            training=False, seed=0)
    one_hot = next(iter(ds))["segmentation"].numpy()
    for i in range(3):
        expected = nearest_class(np.asarray(Image.open(catalog["segmentation"][i]).convert("RGB")))
        np.testing.assert_array_equal(one_hot[i], np.eye(NUM_CLASSES)[expected])


def test_overview_is_antialiased_resize_of_whole_terrain(coordinate_catalog):
    crop = SIZE // 2
    ds = views.make_dataset(coordinate_catalog, views=("overview", "terrain"), crop_size=crop,
                            batch_size=N_SAMPLES, training=True, seed=9, with_ids=True)
    batch = next(iter(ds))
    for overview, sample_id in zip(batch["overview"].numpy(), batch["id"].numpy()):
        terrain = coordinate_images(int(sample_id))[0].astype(np.float32)
        expected = tf.image.resize(terrain, (crop, crop), method="bilinear",
                                   antialias=True).numpy() / 127.5 - 1
        np.testing.assert_allclose(overview, expected, atol=1e-5)
        # Independent check: halving with antialias is the separable [1, 3, 3, 1] / 8 filter.
        def halve_rows(image):  # [2m, ...] -> interior output rows [m - 2, ...]
            inner = 2 * np.arange(1, image.shape[0] // 2 - 1)
            return sum(w * image[inner + offset] for w, offset in zip((1, 3, 3, 1), (-1, 0, 1, 2))) / 8

        naive = halve_rows(halve_rows(terrain).swapaxes(0, 1)).swapaxes(0, 1)   # [crop-2, crop-2, 3]
        np.testing.assert_allclose(overview[1:-1, 1:-1], naive / 127.5 - 1, atol=1e-5)


def test_eval_mode_is_centre_crop_in_catalog_order_and_keeps_remainder(coordinate_catalog):
    def make(seed, epoch):
        return batches(views.make_dataset(coordinate_catalog, views=ALL_VIEWS, crop_size=16,
                                          batch_size=3, training=False, seed=seed, epoch=epoch,
                                          augment=True, with_ids=True))

    first = make(0, 0)
    assert [len(b["id"]) for b in first] == [3, 3, 1]
    assert [i.decode() for b in first for i in b["id"]] == list(coordinate_catalog["id"])
    centre = (SIZE - 16) // 2
    for batch in first:
        for terrain in batch["terrain"]:
            x, y, _ = terrain_coordinates(terrain)
            np.testing.assert_array_equal(x, centre + np.mgrid[0:16, 0:16][1])
            np.testing.assert_array_equal(y, centre + np.mgrid[0:16, 0:16][0])
    assert_same_batches(first, make(5, 3))  # no randomness at all


@pytest.mark.parametrize("size, crop, grid, starts", [
    (256, 64, 4, [0, 64, 128, 192]),   # an exact tiling
    (512, 256, 2, [0, 256]),
    (48, 16, 3, [0, 16, 32]),
    (48, 16, 1, [16]),                 # the centre crop
    (48, 32, 2, [0, 16]),              # cells smaller than the crop: clipped, overlapping
])
def test_window_corners_centre_a_crop_in_each_grid_cell(size, crop, grid, starts):
    corners = views.window_corners(tf.constant([size, size]), crop, grid).numpy()
    expected = [(row, column) for row in starts for column in starts]  # row-major
    assert corners.tolist() == [list(pair) for pair in expected]


def test_eval_grid_gives_every_window_of_each_sample_in_a_row(coordinate_catalog):
    grid, crop = 3, 16
    dataset = views.make_dataset(coordinate_catalog, views=ALL_VIEWS, crop_size=crop,
                                 batch_size=4, training=False, seed=0, with_ids=True, grid=grid)
    got = batches(dataset)
    ids = [i.decode() for b in got for i in b["id"]]
    windows = [int(w) for b in got for w in b["window"]]
    assert ids == [i for i in coordinate_catalog["id"] for _ in range(grid * grid)]
    assert windows == list(range(grid * grid)) * N_SAMPLES
    starts = [0, 16, 32]
    expected_corners = [(row, column) for row in starts for column in starts]
    terrains = np.concatenate([b["terrain"] for b in got])      # [N * 9, 16, 16, 3]
    heights = np.concatenate([b["height"] for b in got])
    overviews = np.concatenate([b["overview"] for b in got])
    single = batches(views.make_dataset(coordinate_catalog, views=("overview",), crop_size=crop,
                                        batch_size=N_SAMPLES, training=False, seed=0))[0]
    for index, (sample_id, window) in enumerate(zip(ids, windows)):
        top, left = expected_corners[window]
        x, y, sample = terrain_coordinates(terrains[index])
        rows, columns = np.mgrid[0:crop, 0:crop]
        np.testing.assert_array_equal(x, left + columns)
        np.testing.assert_array_equal(y, top + rows)
        assert (sample == int(sample_id)).all()
        np.testing.assert_array_equal(height_values(heights[index]),
                                      (top + rows) * SIZE + left + columns)
        # the overview is the whole image, the same for every window of a sample
        np.testing.assert_allclose(overviews[index], single["overview"][int(sample_id)],
                                   atol=1e-6)


def test_eval_grid_skips_an_unreadable_sample_once(catalog_copy):
    victim = 2
    with open(catalog_copy["terrain"].iloc[victim], "wb") as handle:
        handle.write(b"not a png")
    counter = views.SkippedCounter()
    dataset = views.make_dataset(catalog_copy, views=("terrain",), crop_size=16, batch_size=5,
                                 training=False, seed=0, with_ids=True, grid=2,
                                 skipped_counter=counter)
    ids = [i.decode() for b in batches(dataset) for i in b["id"]]
    survivors = [i for k, i in enumerate(catalog_copy["id"]) if k != victim]
    assert ids == [i for i in survivors for _ in range(4)]
    assert counter.ids == [catalog_copy["id"].iloc[victim]]


def test_eval_grid_is_not_for_training(coordinate_catalog):
    with pytest.raises(ValueError, match="grid=2"):
        views.make_dataset(coordinate_catalog, views=("terrain",), crop_size=16, batch_size=2,
                           training=True, seed=0, grid=2)


def test_augmentation_is_identical_across_views(coordinate_catalog):
    plain = batches(views.make_dataset(coordinate_catalog, views=("overview",), crop_size=16,
                                       batch_size=N_SAMPLES, training=False, seed=0))[0]
    seen_transforms = set()
    for epoch in range(2):
        ds = views.make_dataset(coordinate_catalog, views=ALL_VIEWS, crop_size=16, batch_size=3,
                                training=True, seed=2, epoch=epoch, augment=True)
        for batch in batches(ds):
            for b in range(3):
                x, y, sample = terrain_coordinates(batch["terrain"][b])
                top, left = int(y.min()), int(x.min())
                rows, cols = np.mgrid[top:top + 16, left:left + 16]
                matches = [t for t, transform in enumerate(dihedral_transforms())
                           if (transform(cols) == x).all() and (transform(rows) == y).all()]
                assert len(matches) == 1, "terrain crop is not a flipped/rotated window"
                transform = dihedral_transforms()[matches[0]]
                seen_transforms.add(matches[0])
                np.testing.assert_array_equal(height_values(batch["height"][b]), y * SIZE + x)
                np.testing.assert_array_equal(batch["segmentation"][b].argmax(-1),
                                              coordinate_class(x, y))
                np.testing.assert_allclose(batch["overview"][b],
                                           transform(plain["overview"][sample[0, 0]]), atol=1e-6)
    assert len(seen_transforms) >= 4


def test_augmentation_is_off_by_default(coordinate_catalog):
    ds = views.make_dataset(coordinate_catalog, views=("terrain",), crop_size=16, batch_size=N_SAMPLES,
                            training=True, seed=2)
    for terrain in next(iter(ds))["terrain"].numpy():
        x, y, _ = terrain_coordinates(terrain)
        assert (np.diff(x, axis=1) == 1).all() and (np.diff(y, axis=0) == 1).all()


# -- determinism and resume ---------------------------------------------------------------------

def make_training(catalog, **overrides):
    args = dict(views=ALL_VIEWS, crop_size=16, batch_size=2, training=True, seed=11, epoch=1,
                augment=True, with_ids=True)
    args.update(overrides)
    return views.make_dataset(catalog, **args)


def test_same_arguments_give_identical_batches_even_with_parallel_decode(coordinate_catalog):
    first = batches(make_training(coordinate_catalog))
    assert [len(b["id"]) for b in first] == [2, 2, 2]  # remainder dropped in training
    assert len({i for b in first for i in b["id"]}) == 6  # no sample twice in an epoch
    assert_same_batches(first, batches(make_training(coordinate_catalog)))
    assert_same_batches(first, batches(make_training(coordinate_catalog, num_parallel_calls=1)))


def test_skip_resumes_mid_epoch(coordinate_catalog):
    full = batches(make_training(coordinate_catalog))
    assert_same_batches(full[2:], batches(make_training(coordinate_catalog).skip(2)))


def test_start_batch_equals_skip_without_decoding_the_skipped_samples(catalog_copy):
    full = batches(make_training(catalog_copy))
    assert_same_batches(full[2:], batches(make_training(catalog_copy, start_batch=2)))
    # Break every file used by the first two batches: start_batch never reads them.
    first_ids = [i.decode() for b in full[:2] for i in b["id"]]
    for sample_id in first_ids:
        for column in ("terrain", "height", "segmentation"):
            path = catalog_copy.loc[catalog_copy["id"] == sample_id, column].iloc[0]
            with open(path, "wb") as handle:
                handle.write(b"not a png")
    counter = views.SkippedCounter()
    resumed = batches(make_training(catalog_copy, start_batch=2, skipped_counter=counter))
    assert_same_batches(full[2:], resumed)
    assert counter.count == 0
    with pytest.raises(ValueError, match="start_batch"):
        make_training(catalog_copy, training=False, start_batch=1)


def test_positions_resume_at_the_next_sample_after_an_unreadable_one(catalog_copy):
    intact = batches(make_training(catalog_copy, with_positions=True))
    assert [list(b["position"]) for b in intact] == [[0, 1], [2, 3], [4, 5]]
    victim = intact[0]["id"][0].decode()  # plan place 0
    path = catalog_copy.loc[catalog_copy["id"] == victim, "terrain"].iloc[0]
    with open(path, "wb") as handle:
        handle.write(b"not a png")

    damaged = batches(make_training(catalog_copy, with_positions=True))
    assert [list(b["position"]) for b in damaged] == [[1, 2], [3, 4], [5, 6]]
    next_place = int(damaged[0]["position"].max()) + 1
    counter = views.SkippedCounter()
    resumed = batches(make_training(catalog_copy, with_positions=True, start_position=next_place,
                                    skipped_counter=counter))
    assert_same_batches(damaged[1:], resumed)
    assert counter.count == 0  # the unreadable sample lies before the resume point
    # Batches x B lands one place early and would train plan place 2 twice.
    early = batches(make_training(catalog_copy, with_positions=True, start_batch=1))
    assert list(early[0]["position"]) == [2, 3]
    with pytest.raises(ValueError, match="not both"):
        make_training(catalog_copy, start_batch=1, start_position=2)
    with pytest.raises(ValueError, match="start_position"):
        make_training(catalog_copy, training=False, start_position=2)


def test_epochs_and_seeds_change_order_and_crops(coordinate_catalog):
    def ids(dataset):
        return [i for b in batches(dataset) for i in b["id"]]

    base = make_training(coordinate_catalog, batch_size=N_SAMPLES, augment=False)
    other_epoch = make_training(coordinate_catalog, batch_size=N_SAMPLES, augment=False, epoch=2)
    other_seed = make_training(coordinate_catalog, batch_size=N_SAMPLES, augment=False, seed=12)
    assert ids(base) != ids(other_epoch) and ids(base) != ids(other_seed)
    assert sorted(ids(base)) == sorted(ids(other_epoch))
    # Same sample, different epoch: the crop window moves.
    crops = {}
    for name, dataset in (("base", base), ("other", other_epoch)):
        batch = batches(dataset)[0]
        crops[name] = {i: t for i, t in zip(batch["id"], batch["terrain"])}
    assert any(not np.array_equal(crops["base"][i], crops["other"][i]) for i in crops["base"])


def test_epoch_plan_is_a_permutation_and_pure():
    order, seeds = views.epoch_plan(50, seed=3, epoch=7, training=True)
    assert sorted(order) == list(range(50)) and seeds.shape == (50, 2)
    again = views.epoch_plan(50, seed=3, epoch=7, training=True)
    np.testing.assert_array_equal(order, again[0])
    np.testing.assert_array_equal(seeds, again[1])
    eval_order, _ = views.epoch_plan(5, seed=3, epoch=7, training=False)
    np.testing.assert_array_equal(eval_order, np.arange(5))


# -- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "garbage", "deleted"])
@pytest.mark.parametrize("victim", [0, N_SAMPLES - 1])  # first and last position of the epoch
def test_unreadable_file_is_skipped_and_counted(catalog_copy, damage, victim):
    path = catalog_copy["height"].iloc[victim]
    data = open(path, "rb").read()
    if damage == "deleted":
        import os
        os.remove(path)
    else:
        with open(path, "wb") as handle:
            handle.write(data[: len(data) // 2] if damage == "truncated" else b"not a png")
    counter = views.SkippedCounter()
    ds = views.make_dataset(catalog_copy, views=("terrain", "height"), crop_size=16, batch_size=2,
                            training=False, seed=0, with_ids=True, skipped_counter=counter)
    got = [i.decode() for b in batches(ds) for i in b["id"]]
    expected = [i for k, i in enumerate(catalog_copy["id"]) if k != victim]
    assert got == expected
    assert counter.count == 1 and counter.ids == [catalog_copy["id"].iloc[victim]]


def test_unreadable_file_in_training_epoch(catalog_copy, caplog):
    broken = Path(catalog_copy["segmentation"].iloc[3])
    with open(broken, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\nbroken")
    counter = views.SkippedCounter()
    ds = make_training(catalog_copy, batch_size=3, skipped_counter=counter)
    with caplog.at_level("WARNING", logger="cmc_kit.views"):
        ids = [i.decode() for b in batches(ds) for i in b["id"]]
    assert len(ids) == 6 and catalog_copy["id"].iloc[3] not in ids
    assert counter.count == 1
    # The warning names the sample and the command to run on its folder.
    message = " ".join(r.getMessage() for r in caplog.records if r.name == "cmc_kit.views")
    assert catalog_copy["id"].iloc[3] in message
    assert f"cmc-kit validate {broken.parent}`" in message


def test_bad_arguments_name_the_setting(coordinate_catalog):
    with pytest.raises(ValueError, match="views"):
        views.make_dataset(coordinate_catalog, views=("terrain", "colour"), crop_size=16,
                           batch_size=2, training=True, seed=0)
    from cmc_kit.errors import CmcKitError

    # A setting the user chose: a CmcKitError, which the CLI prints as one line.
    with pytest.raises(CmcKitError, match=rf"'data.crop_size' \({SIZE + 1}\).*at most {SIZE}"):
        views.make_dataset(coordinate_catalog, views=("terrain",), crop_size=SIZE + 1,
                           batch_size=2, training=True, seed=0)
    with pytest.raises(DataError, match="batch_size"):
        views.make_dataset(coordinate_catalog, views=("terrain",), crop_size=16,
                           batch_size=N_SAMPLES + 1, training=True, seed=0)
    with pytest.raises(DataError, match="segmentation"):
        views.make_dataset(coordinate_catalog[["id", "terrain"]], views=("segmentation",),
                           crop_size=16, batch_size=2, training=True, seed=0)


# -- cache ------------------------------------------------------------------------------------

def test_cache_layout_is_compact(cache_dir):
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["image_size"] == [SIZE, SIZE]
    assert [len(s["ids"]) for s in manifest["shards"]] == [3, 3, 1]
    segmentation = np.load(cache_dir / "shard-00001" / "segmentation.npy")
    assert segmentation.dtype == np.uint8 and segmentation.shape == (3, SIZE, SIZE, 1)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    np.testing.assert_array_equal(segmentation[0, ..., 0], coordinate_class(x, y))
    height = np.load(cache_dir / "shard-00000" / "height.npy")
    assert height.dtype == np.uint16
    np.testing.assert_array_equal(height[2, ..., 0], y * SIZE + x)


@pytest.mark.parametrize("training", [True, False])
def test_cache_gives_the_same_batches_as_pngs(coordinate_catalog, cache_dir, training):
    from_png = batches(make_training(coordinate_catalog, training=training))
    from_cache = batches(make_training(coordinate_catalog, training=training, cache=cache_dir))
    assert_same_batches(from_png, from_cache)


def test_cache_serves_a_subset_and_rejects_unknown_ids(coordinate_catalog, cache_dir):
    subset = coordinate_catalog.iloc[[5, 1, 3, 6]].reset_index(drop=True)
    assert_same_batches(batches(make_training(subset, cache=cache_dir)),
                        batches(make_training(subset)))
    ids_only = subset[["id"]]  # the cache path needs no file paths
    assert_same_batches(batches(make_training(ids_only, cache=cache_dir)),
                        batches(make_training(subset)))
    unknown = pd.concat([subset, pd.DataFrame([{"id": "9999"}])], ignore_index=True)
    with pytest.raises(DataError, match="cmc-kit prepare") as info:
        make_training(unknown, cache=cache_dir)
    assert str(cache_dir) in str(info.value) and "9999" in str(info.value)


def test_missing_cache_names_the_fix(coordinate_catalog, tmp_path):
    with pytest.raises(DataError, match="cmc-kit prepare"):
        make_training(coordinate_catalog, cache=tmp_path / "nothing")


def test_prepare_is_idempotent_and_resumes(coordinate_catalog, tmp_path, monkeypatch):
    cache = shard_cache.prepare_cache(coordinate_catalog, tmp_path / "cache", shard_size=3,
                                progress=False)
    manifest = (cache / "manifest.json").read_text()
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.glob("shard-*/*.npy")}

    def must_not_decode(**paths):
        raise AssertionError(f"prepare_cache decoded again: {paths}")

    with monkeypatch.context() as patch:
        patch.setattr(shard_cache, "decode_sample", must_not_decode)
        shard_cache.prepare_cache(coordinate_catalog, cache, shard_size=3, progress=False)
    assert (cache / "manifest.json").read_text() == manifest
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("shard-*/*.npy")} == stamps

    # An interrupted run: one shard missing, a half-written temporary folder left behind.
    untouched = (cache / "shard-00000" / "terrain.npy").stat().st_mtime_ns
    shutil.rmtree(cache / "shard-00001")
    (cache / ".shard-00001.tmp-12345").mkdir()
    shard_cache.prepare_cache(coordinate_catalog, cache, shard_size=3, progress=False)
    assert (cache / "shard-00000" / "terrain.npy").stat().st_mtime_ns == untouched
    assert (cache / "shard-00001" / "terrain.npy").exists()
    assert not list(cache.glob(".shard-*"))
    assert (cache / "manifest.json").read_text() == manifest


def test_prepare_from_a_folder(coordinate_catalog, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(__import__("pathlib").Path(coordinate_catalog["terrain"][0]).parent,
                    root / "_dataset")
    cache = shard_cache.prepare_cache(root, tmp_path / "cache", progress=False)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert [i for s in manifest["shards"] for i in s["ids"]] == list(coordinate_catalog["id"])


def test_cache_skips_samples_unreadable_at_prepare_time(catalog_copy, tmp_path):
    with open(catalog_copy["terrain"].iloc[4], "wb") as handle:
        handle.write(b"garbage")
    cache = shard_cache.prepare_cache(catalog_copy, tmp_path / "cache", shard_size=3, progress=False)
    counters = views.SkippedCounter(), views.SkippedCounter()
    from_png = batches(make_training(catalog_copy, batch_size=3, skipped_counter=counters[0]))
    from_cache = batches(make_training(catalog_copy, batch_size=3, cache=cache,
                                       skipped_counter=counters[1]))
    assert_same_batches(from_png, from_cache)
    assert [c.ids for c in counters] == [[catalog_copy["id"].iloc[4]]] * 2


def test_only_the_needed_files_are_decoded(catalog_copy):
    for path in catalog_copy["segmentation"]:
        with open(path, "wb") as handle:
            handle.write(b"broken, but terrain+height never read it")
    counter = views.SkippedCounter()
    ds = make_training(catalog_copy, views=("terrain", "height"), skipped_counter=counter)
    assert sum(len(b["id"]) for b in batches(ds)) == 6 and counter.count == 0


def test_sample_with_mismatched_image_sizes_is_skipped_not_misaligned(catalog_copy):
    Image.fromarray(np.zeros((SIZE // 2, SIZE // 2), np.uint16)).save(catalog_copy["height"].iloc[1])
    counter = views.SkippedCounter()
    ds = views.make_dataset(catalog_copy, views=("terrain", "height"), crop_size=16, batch_size=3,
                            training=False, seed=0, skipped_counter=counter)
    assert sum(len(b["terrain"]) for b in batches(ds)) == N_SAMPLES - 1
    assert counter.ids == [catalog_copy["id"].iloc[1]]


def test_prepare_rejects_a_sample_of_another_size(catalog_copy, tmp_path):
    for column in decode.SOURCES:
        image = Image.open(catalog_copy[column].iloc[5])
        image.resize((SIZE // 2, SIZE // 2)).save(catalog_copy[column].iloc[5])
    with pytest.raises(DataError, match="one size") as info:
        shard_cache.prepare_cache(catalog_copy, tmp_path / "cache", shard_size=3, progress=False)
    assert catalog_copy["id"].iloc[5] in str(info.value)
    assert not list((tmp_path / "cache").glob(".shard-*"))  # no half-written shard left
