"""Synthetic dataset: Kaggle layout, dtypes, determinism, and terrain-like structure."""

import json
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cmc_kit import cli, synth
from cmc_kit.errors import DataError
from cmc_kit.palette import CLASS_NAMES, PALETTE

N, SIZE, SEED = 6, 64, 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synth.generate(root, n=N, size=SIZE, seed=SEED, progress=False)
    return root


def _exact_class_ids(rgb):
    """Class id per pixel by exact palette match; -1 where no palette colour matches."""
    matches = (rgb[..., None, :] == PALETTE[None, None]).all(-1)  # [H, W, 7]
    return np.where(matches.any(-1), matches.argmax(-1), -1)


def test_layout_names_and_dtypes(dataset):
    folder = dataset / "_dataset"
    expected = {f"{i:04d}_{kind}.png" for i in range(1, N + 1) for kind in ("t", "h", "i2")}
    assert {p.name for p in folder.iterdir()} == expected
    assert (dataset / "metadata.csv").is_file()
    for i in range(1, N + 1):
        with Image.open(folder / f"{i:04d}_t.png") as terrain:
            assert (terrain.format, terrain.mode, terrain.size) == ("PNG", "RGB", (SIZE, SIZE))
        with Image.open(folder / f"{i:04d}_h.png") as height:
            assert height.mode == "I;16" and height.size == (SIZE, SIZE)
            values = np.asarray(height)
        assert values.dtype == np.uint16 and values.max() > 255  # really 16-bit content
        with Image.open(folder / f"{i:04d}_i2.png") as seg:
            assert seg.mode == "RGB"
            ids = _exact_class_ids(np.asarray(seg))
        assert (ids >= 0).all(), "segmentation holds a colour outside the palette"


def test_height_png_reads_back_exactly_with_tensorflow_and_pil(tmp_path):
    tf = pytest.importorskip("tensorflow")
    _, height, _, _ = synth.generate_sample(11, 48)
    synth._save_png(height, tmp_path / "0001_h.png")
    with Image.open(tmp_path / "0001_h.png") as image:
        np.testing.assert_array_equal(np.asarray(image), height)
    decoded = tf.io.decode_png(tf.io.read_file(str(tmp_path / "0001_h.png")), dtype=tf.uint16)
    np.testing.assert_array_equal(decoded.numpy()[..., 0], height)


def test_metadata_columns_and_fractions_match_pixels(dataset):
    table = synth.load_metadata(dataset)
    fraction_columns = [f"fraction_{name}" for name in CLASS_NAMES]
    assert list(table.columns) == ["id", *synth.PARAMETERS, *fraction_columns]
    assert list(table["id"]) == [f"{i:04d}" for i in range(1, N + 1)]
    np.testing.assert_allclose(table[fraction_columns].sum(axis=1), 1.0, atol=1e-5)
    for row in table.itertuples(index=False):
        with Image.open(dataset / "_dataset" / f"{row.id}_i2.png") as seg:
            ids = _exact_class_ids(np.asarray(seg))
        counted = np.bincount(ids.ravel(), minlength=7) / ids.size
        np.testing.assert_allclose([getattr(row, c) for c in fraction_columns], counted, atol=1e-5)


def test_metadata_csv_keeps_zero_padded_ids_as_text(dataset):
    # The raw file must hold "0001", not 1, so any reader with dtype=str round-trips it.
    first_data_line = (dataset / "metadata.csv").read_text().splitlines()[1]
    assert first_data_line.startswith("0001,")


def test_load_metadata_names_the_folder_and_the_fix(dataset, tmp_path):
    assert sorted(p.name for p in dataset.iterdir()) == ["_dataset", "metadata.csv"]  # no temp
    with pytest.raises(DataError, match=re.escape(f"`cmc-kit synth {tmp_path}`")):
        synth.load_metadata(tmp_path)
    (tmp_path / "metadata.csv").write_text("name,value\na,1\n")
    with pytest.raises(DataError, match="no 'id' column"):
        synth.load_metadata(tmp_path)


def test_same_seed_gives_identical_bytes_and_other_seed_differs(dataset, tmp_path):
    again = synth.generate(tmp_path / "again", n=N, size=SIZE, seed=SEED, progress=False, workers=1)
    other = synth.generate(tmp_path / "other", n=N, size=SIZE, seed=SEED + 1, progress=False)
    for path in sorted((dataset / "_dataset").iterdir()):
        assert (again / "_dataset" / path.name).read_bytes() == path.read_bytes(), path.name
        assert (other / "_dataset" / path.name).read_bytes() != path.read_bytes(), path.name
    assert (again / "metadata.csv").read_bytes() == (dataset / "metadata.csv").read_bytes()


def test_sample_depends_only_on_seed_and_index(dataset, tmp_path):
    fewer = synth.generate(tmp_path / "fewer", n=2, size=SIZE, seed=SEED, progress=False)
    for name in ("0001_t.png", "0002_h.png", "0002_i2.png"):
        assert (fewer / "_dataset" / name).read_bytes() == (dataset / "_dataset" / name).read_bytes()


def test_generate_sample_is_deterministic_and_returns_declared_types():
    a = synth.generate_sample(5, 32)
    b = synth.generate_sample(np.random.default_rng(5), 32)
    terrain, height, classes, params = a
    assert terrain.shape == (32, 32, 3) and terrain.dtype == np.uint8
    assert height.shape == (32, 32) and height.dtype == np.uint16
    assert classes.shape == (32, 32) and classes.dtype == np.uint8 and classes.max() < 7
    assert set(params) == set(synth.PARAMETERS)
    for x, y in zip(a[:3], b[:3]):
        np.testing.assert_array_equal(x, y)
    assert a[3] == b[3]


def test_parameters_vary_across_samples():
    params = pd.DataFrame([synth.generate_sample(np.random.SeedSequence([0, i]), 24)[3] for i in range(12)])
    for name in synth.PARAMETERS:
        assert params[name].nunique() >= 2, name
    assert params["relief_m"].max() > 3 * params["relief_m"].min()


def test_water_is_exactly_below_sea_level():
    for seed in range(4):
        _, height, classes, _ = synth.generate_sample(seed, 64)
        np.testing.assert_array_equal(classes == 0, height < synth.HEIGHT_SEA_LEVEL)


def test_segmentation_forms_regions_not_speckle():
    for seed in range(4):
        _, _, c, _ = synth.generate_sample(seed, 96)
        inner = c[1:-1, 1:-1]
        neighbours = (c[:-2, 1:-1], c[2:, 1:-1], c[1:-1, :-2], c[1:-1, 2:])
        interior = np.logical_and.reduce([inner == n for n in neighbours]).mean()
        isolated = np.logical_and.reduce([inner != n for n in neighbours]).mean()
        # Independent per-pixel labels over 7 classes would give interior ~(1/7)^4 = 0.0004
        # and isolated ~(6/7)^4 = 0.54.
        assert interior > 0.6 and isolated < 0.01, (seed, interior, isolated)


def test_terrain_colour_is_not_a_function_of_the_class():
    terrain, _, classes, _ = synth.generate_sample(2, 96)
    for class_id in np.unique(classes):
        pixels = terrain[classes == class_id].astype(float)
        if len(pixels) > 100:
            assert pixels.std(axis=0).max() > 3.0, CLASS_NAMES[class_id]


def test_climate_parameters_drive_the_classes():
    rows = []
    for i in range(24):
        _, _, classes, params = synth.generate_sample(np.random.SeedSequence([1, i]), 48)
        fractions = np.bincount(classes.ravel(), minlength=7) / classes.size
        rows.append({**params, **{f"fraction_{n}": f for n, f in zip(CLASS_NAMES, fractions)}})
    table = pd.DataFrame(rows)
    rank = table.rank()
    assert rank["aridity"].corr(rank["fraction_desert"]) > 0.3
    assert rank["temperature_c"].corr(rank["fraction_tundra"]) < -0.3
    assert rank["base_elevation_m"].corr(rank["fraction_water"]) < -0.3


def test_hillshade_lights_slopes_facing_north_west():
    rows, cols = np.mgrid[0:16, 0:16].astype(np.float32)
    gradient = 100.0  # metres per pixel of 1 km, before exaggeration
    rising_south_east = gradient * (rows + cols)  # faces north-west, towards the light
    flat = np.zeros((16, 16), np.float32)

    def expected(dz_east, dz_north):
        normal = np.array([-dz_east, -dz_north, 1.0]) / np.sqrt(1 + dz_east**2 + dz_north**2)
        light = np.array([-0.5, 0.5, np.sqrt(0.5)])  # north-west, 45 degrees up
        return max(normal @ light, 0.0) / np.sqrt(0.5)

    g = gradient * 3.0 / 1000.0  # exaggeration 3, pixel 1000 m
    towards = synth.hillshade(rising_south_east, 1000.0)[8, 8]
    away = synth.hillshade(-rising_south_east, 1000.0)[8, 8]
    assert towards == pytest.approx(expected(g, -g), rel=1e-5)
    assert away == pytest.approx(expected(-g, g), rel=1e-5)
    assert towards > 1.0 > away
    np.testing.assert_allclose(synth.hillshade(flat, 1000.0), 1.0)


def test_rerun_overwrites_but_foreign_files_are_refused(tmp_path):
    synth.generate(tmp_path, n=3, size=24, seed=0, progress=False)
    synth.generate(tmp_path, n=3, size=24, seed=1, progress=False)  # same ids: overwritten
    with pytest.raises(DataError, match=r"_dataset.*empty folder"):
        synth.generate(tmp_path, n=2, size=24, seed=0, progress=False)


def test_bad_arguments_name_the_setting():
    with pytest.raises(ValueError, match="size"):
        synth.generate_sample(0, 8)
    with pytest.raises(ValueError, match="n must be"):
        synth.generate("unused", n=0)


def test_cli_synth_writes_dataset(tmp_path, capsys):
    assert cli.main(["synth", str(tmp_path / "out"), "--n", "2", "--size", "24", "--seed", "4"]) == 0
    assert len(list((tmp_path / "out" / "_dataset").glob("*.png"))) == 6
    assert "Wrote 2 synthetic samples" in capsys.readouterr().out
    assert json.loads(pd.read_csv(tmp_path / "out" / "metadata.csv", dtype={"id": str})
                      .to_json(orient="records"))[1]["id"] == "0002"
