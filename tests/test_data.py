"""Discovery, splitting and validation of Terrain Map folders (no network, no TensorFlow)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cmc_kit import cli, data, synth
from cmc_kit.errors import DataError
from cmc_kit.palette import PALETTE, nearest_class, palette_distance

SIZE = 32


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    synth.generate(root, n=10, size=SIZE, seed=5, progress=False)
    return root


# -- discovery ----------------------------------------------------------------------------------

def test_round_trip_synth_discover_validate(clean_root):
    catalog = data.discover(clean_root)
    assert list(catalog.columns) == ["id", "terrain", "height", "segmentation"]
    assert list(catalog["id"]) == [f"{i:04d}" for i in range(1, 11)]
    for row in catalog.itertuples():
        assert row.terrain.endswith(f"{row.id}_t.png") and row.height.endswith(f"{row.id}_h.png")
        assert row.segmentation.endswith(f"{row.id}_i2.png")
    report = data.validate(clean_root)
    assert report.num_usable == 10 and report.problems == []
    assert report.num_incomplete == report.num_unreadable == 0
    pd.testing.assert_frame_equal(report.usable, catalog)


def _write_triplet(folder, sample_id, size=8):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(folder / f"{sample_id}_t.png")
    Image.fromarray(np.full((size, size), 1000, np.uint16)).save(folder / f"{sample_id}_h.png")
    Image.fromarray(np.broadcast_to(PALETTE[1], (size, size, 3)).copy()).save(folder / f"{sample_id}_i2.png")


def test_discover_is_recursive_at_any_depth_and_sorts_ids_numerically(tmp_path):
    _write_triplet(tmp_path / "a" / "b" / "c" / "d", "10")
    _write_triplet(tmp_path, "9")
    _write_triplet(tmp_path / "x", "0002")
    (tmp_path / "x" / "notes_t.txt").write_text("not an image")
    catalog = data.discover(tmp_path)
    assert list(catalog["id"]) == ["0002", "9", "10"]
    assert catalog.set_index("id").at["10", "height"] == str(tmp_path / "a/b/c/d/10_h.png")


def test_discover_incomplete_samples_only_on_request(tmp_path):
    _write_triplet(tmp_path, "0001")
    _write_triplet(tmp_path, "0002")
    (tmp_path / "0002_h.png").unlink()
    assert list(data.discover(tmp_path)["id"]) == ["0001"]
    everything = data.discover(tmp_path, include_incomplete=True).set_index("id")
    assert everything.at["0002", "height"] is None
    assert everything.at["0002", "terrain"] == str(tmp_path / "0002_t.png")


def test_discover_errors_name_the_root_and_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*cmc-kit synth.*cmc-kit download") as err:
        data.discover(tmp_path / "missing")
    assert str(tmp_path / "missing") in str(err.value)
    with pytest.raises(DataError, match=r"no sample files.*cmc-kit synth"):
        data.discover(tmp_path)


def test_discover_duplicate_ids_name_both_paths(tmp_path):
    _write_triplet(tmp_path / "copy1", "0001")
    _write_triplet(tmp_path / "copy2", "0001")
    with pytest.raises(DataError) as err:
        data.discover(tmp_path)
    message = str(err.value)
    assert str(tmp_path / "copy1") in message and str(tmp_path / "copy2") in message


def test_catalog_ids_are_strings_and_bad_catalogs_name_the_fix():
    ids = data.catalog_ids(pd.DataFrame({"id": [3, "0002", 10]}))
    assert list(ids) == ["3", "0002", "10"]
    for catalog, message in ((pd.DataFrame({"terrain": ["a"]}), "no 'id' column.*discover"),
                             (pd.DataFrame({"id": []}), "empty"),
                             (pd.DataFrame({"id": ["7", 7, "8"]}), r"repeats sample id\(s\) \['7'\]")):
        with pytest.raises(DataError, match=message):
            data.catalog_ids(catalog)


# -- split --------------------------------------------------------------------------------------

def _ids(n):
    return pd.DataFrame({"id": [f"{i:04d}" for i in range(1, n + 1)]})


def test_split_is_reproducible_disjoint_complete_and_sorted():
    catalog = _ids(200)
    train, validation = data.split_catalog(catalog, validation_fraction=0.2, seed=3)
    again_train, again_validation = data.split_catalog(catalog.sample(frac=1, random_state=0),
                                                       validation_fraction=0.2, seed=3)
    pd.testing.assert_frame_equal(train, again_train)
    pd.testing.assert_frame_equal(validation, again_validation)
    assert not set(train["id"]) & set(validation["id"])
    assert set(train["id"]) | set(validation["id"]) == set(catalog["id"])
    assert list(train["id"]) == sorted(train["id"]) and list(validation["id"]) == sorted(validation["id"])
    assert set(train["split"]) == {"train"} and set(validation["split"]) == {"validation"}
    _, other = data.split_catalog(catalog, validation_fraction=0.2, seed=4)
    assert set(other["id"]) != set(validation["id"])


def test_split_fraction_is_respected_on_large_catalogs():
    _, validation = data.split_catalog(_ids(5000), validation_fraction=0.1, seed=0)
    assert 0.08 < len(validation) / 5000 < 0.12


def test_split_side_of_a_sample_does_not_depend_on_the_others():
    catalog = _ids(100)
    _, validation = data.split_catalog(catalog, validation_fraction=0.3, seed=1)
    _, validation_subset = data.split_catalog(catalog.iloc[::2], validation_fraction=0.3, seed=1)
    assert set(validation_subset["id"]) == set(validation["id"]) & set(catalog["id"].iloc[::2])


def test_split_matches_an_independent_sha1_rule():
    import hashlib
    catalog = _ids(50)
    _, validation = data.split_catalog(catalog, validation_fraction=0.25, seed=9)
    expected = {i for i in catalog["id"]
                if int.from_bytes(hashlib.sha1(f"9:{i}".encode()).digest()[:8], "big") / 2**64 < 0.25}
    assert set(validation["id"]) == expected


def test_split_tiny_catalogs_and_bad_fraction():
    for seed in range(5):
        train, validation = data.split_catalog(_ids(2), validation_fraction=0.01, seed=seed)
        assert len(train) == 1 and len(validation) == 1
    train, validation = data.split_catalog(_ids(5), validation_fraction=0.0, seed=0)
    assert len(train) == 5 and len(validation) == 0
    with pytest.raises(ValueError, match="validation_fraction"):
        data.split_catalog(_ids(5), validation_fraction=1.0, seed=0)


# -- nearest palette colour ---------------------------------------------------------------------

def test_nearest_palette_mapping_matches_a_naive_loop_on_noisy_and_off_palette_colours():
    rng = np.random.default_rng(0)
    near = PALETTE[rng.integers(0, 7, 300)].astype(int) + rng.normal(0, 12, (300, 3)).round().astype(int)
    far = rng.integers(0, 256, (300, 3))
    pixels = np.clip(np.concatenate([near, far]), 0, 255).astype(np.uint8).reshape(20, 30, 3)
    ids, distances = nearest_class(pixels), palette_distance(pixels)
    for index in np.ndindex(pixels.shape[:2]):
        colour = pixels[index].astype(float)
        naive = [np.sqrt(((colour - p) ** 2).sum()) for p in PALETTE.astype(float)]
        assert ids[index] == int(np.argmin(naive))
        assert distances[index] == pytest.approx(min(naive))


# -- validation of bad inputs -------------------------------------------------------------------

def _rgb(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture
def broken_root(clean_root, tmp_path):
    root = Path(shutil.copytree(clean_root, tmp_path / "data"))
    folder = root / "_dataset"
    (folder / "0001_h.png").unlink()                                        # missing partner
    (folder / "0002_t.png").write_bytes(b"this is not a png at all")        # corrupt
    full = (folder / "0003_i2.png").read_bytes()
    (folder / "0003_i2.png").write_bytes(full[: len(full) // 2])           # truncated
    Image.fromarray(np.zeros((SIZE + 8, SIZE + 8, 3), np.uint8)).save(folder / "0004_t.png")  # size
    with Image.open(folder / "0005_h.png") as height:                       # 8-bit height
        Image.fromarray((np.asarray(height) >> 8).astype(np.uint8)).save(folder / "0005_h.png")
    noise = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "0006_i2.png")                     # off palette
    seg = _rgb(folder / "0007_i2.png").astype(int)                          # JPEG-ish noise: fine
    jpegish = np.clip(seg + np.random.default_rng(2).normal(0, 6, seg.shape).round(), 0, 255)
    Image.fromarray(jpegish.astype(np.uint8)).save(folder / "0007_i2.png")
    for view in ("t", "h", "i2"):                                           # not square
        with Image.open(folder / f"0008_{view}.png") as image:
            image.crop((0, 0, SIZE, SIZE - 4)).save(folder / f"0008_{view}.png")
    return root


EXPECTED_PROBLEMS = {  # id -> (kind, file name)
    "0001": ("missing", "0001_h.png"),
    "0002": ("unreadable", "0002_t.png"),
    "0003": ("unreadable", "0003_i2.png"),
    "0004": ("wrong_size", "0004_t.png"),
    "0005": ("height_8bit", "0005_h.png"),
    "0006": ("off_palette", "0006_i2.png"),
    "0008": ("wrong_size", "0008_t.png"),
}


def test_validate_reports_each_bad_input_with_its_file_and_excludes_it(broken_root):
    report = data.validate(broken_root)
    found = {(p.id, p.kind, p.file) for p in report.problems}
    expected = {(i, kind, str(broken_root / "_dataset" / name)) for i, (kind, name) in EXPECTED_PROBLEMS.items()}
    assert found == expected
    assert list(report.usable["id"]) == ["0007", "0009", "0010"]
    assert (report.num_usable, report.num_incomplete, report.num_unreadable) == (3, 1, 6)
    assert report.counts == {"missing": 1, "unreadable": 2, "wrong_size": 2, "wrong_mode": 0,
                             "height_8bit": 1, "off_palette": 1, "too_large": 0, "bad_name": 0}
    text = report.format()
    for _, kind, path in expected:
        assert path in text and f"[{kind}]" in text
    assert json.loads(json.dumps(report.to_dict()))["num_usable"] == 3


def test_validate_header_only_skips_pixel_problems(broken_root):
    report = data.validate(broken_root, check_pixels=False)
    kinds = {p.id: p.kind for p in report.problems}
    assert "0003" not in kinds and "0006" not in kinds  # truncated data / colours need pixels
    assert kinds["0002"] == "unreadable" and kinds["0005"] == "height_8bit"
    assert "pixels not checked" in report.format()


def test_validate_flags_a_sample_of_another_size_than_the_dataset(clean_root, tmp_path):
    root = Path(shutil.copytree(clean_root, tmp_path / "data"))
    folder = root / "_dataset"
    for view in ("t", "h", "i2"):  # consistent and square, but half the dataset's size
        with Image.open(folder / f"0002_{view}.png") as image:
            image.resize((SIZE // 2, SIZE // 2), Image.Resampling.NEAREST).save(folder / f"0002_{view}.png")
    report = data.validate(root)
    [problem] = report.problems
    assert (problem.id, problem.kind, problem.file) == ("0002", "wrong_size", str(folder / "0002_t.png"))
    assert f"{SIZE // 2}x{SIZE // 2}" in problem.message and f"{SIZE}x{SIZE}" in problem.message
    assert "0002" not in set(report.usable["id"])


def test_zero_usable_samples_fail_clearly(tmp_path, capsys):
    _write_triplet(tmp_path, "0001")
    (tmp_path / "0001_t.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    report = data.validate(tmp_path)
    assert report.num_usable == 0
    with pytest.raises(DataError, match=r"No usable samples.*0001_t.png.*cmc-kit validate"):
        report.require_usable()
    assert cli.main(["validate", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "0 usable" in out and str(tmp_path / "0001_t.png") in out and "No usable samples" in out


def test_cli_validate_json_and_missing_folder(clean_root, tmp_path, capsys):
    assert cli.main(["validate", str(clean_root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_usable"] == 10
    assert cli.main(["validate", str(tmp_path / "nowhere")]) != 0
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere") in err and "cmc-kit synth" in err
