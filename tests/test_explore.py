"""Explorer widget callbacks, standalone page (in headless Chromium), mosaic, feature maps."""

import base64
import io
import json
import re
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cmc_kit import CLASS_NAMES, PALETTE, embed, explore

SIZE = 32
N = 12


def sample_colour(index):
    """A distinct solid terrain colour per sample, far from its neighbours."""
    return np.array([(37 * index + 20) % 256, (91 * index + 60) % 256, (53 * index + 140) % 256],
                    dtype=np.uint8)


@pytest.fixture
def dataset(tmp_path):
    """N samples: solid terrain colour, height ramp left->right, one segmentation class each."""
    folder = tmp_path / "_dataset"
    folder.mkdir()
    ramp = np.tile(np.linspace(1000, 60000, SIZE).astype(np.uint16), (SIZE, 1))
    rows = []
    for i in range(N):
        sample_id = f"{i + 1:04d}"
        terrain = np.full((SIZE, SIZE, 3), sample_colour(i))
        Image.fromarray(terrain).save(folder / f"{sample_id}_t.png")
        Image.fromarray(ramp).save(folder / f"{sample_id}_h.png")
        segmentation = np.full((SIZE, SIZE, 3), PALETTE[i % 7])
        Image.fromarray(segmentation).save(folder / f"{sample_id}_i2.png")
        rows.append({"id": sample_id, "terrain": str(folder / f"{sample_id}_t.png"),
                     "height": str(folder / f"{sample_id}_h.png"),
                     "segmentation": str(folder / f"{sample_id}_i2.png")})
    catalog = pd.DataFrame(rows)
    rng = np.random.default_rng(0)
    table = embed.embeddings_frame(catalog["id"], rng.normal(size=(N, 6)))
    fractions = np.eye(7)[np.arange(N) % 7]
    for k, column in enumerate(embed.FRACTION_COLUMNS):
        table[column] = fractions[:, k]
    table["dominant_class_id"] = np.arange(N) % 7
    table["dominant_class"] = [CLASS_NAMES[i % 7] for i in range(N)]
    table["height_mean"] = np.arange(N, dtype=float) * 100
    table["height_std"] = 1.0
    table["hemisphere"] = ["north", "south"] * (N // 2)
    layout = rng.normal(size=(N, 2)).astype(np.float32)
    return types.SimpleNamespace(root=tmp_path, catalog=catalog, table=table, layout=layout)


def decoded(payload):
    return np.asarray(Image.open(io.BytesIO(payload)).convert("RGB")).astype(int)


def assert_solid(payload, colour, tolerance):
    pixels = decoded(payload)
    assert np.abs(pixels - np.asarray(colour, int)).max() <= tolerance


# -- thumbnails and colours ------------------------------------------------------------------

def test_thumbnails_show_the_samples_images(dataset):
    thumbs = explore.make_thumbnails(dataset.catalog, ["0003", "0010"], size=16)
    assert set(thumbs) == {"0003", "0010"}
    assert_solid(thumbs["0003"]["terrain"], sample_colour(2), tolerance=6)  # JPEG
    assert_solid(thumbs["0010"]["segmentation"], PALETTE[9 % 7], tolerance=0)
    height = decoded(thumbs["0003"]["height"])
    assert height.shape == (16, 16, 3)
    colour_map = explore.height_colour_map().astype(int)
    # Per-image stretch: the low (left) edge gets the ramp's first colour, the high edge its last.
    # (JPEG with chroma subsampling: some error at the edges.)
    assert np.abs(height[:, 0].mean(axis=0) - colour_map[0]).max() < 25
    assert np.abs(height[:, -1].mean(axis=0) - colour_map[-1]).max() < 25
    assert np.abs(height[:, 0].mean(axis=0) - colour_map[-1]).max() > 100
    with pytest.raises(explore.DataError, match="not in the catalog"):
        explore.make_thumbnails(dataset.catalog, ["9999"])


def test_read_sample_returns_the_pixels_and_closes_every_file(dataset, tmp_path, monkeypatch):
    opened = []
    real_open = Image.open

    def recording_open(*args, **kwargs):
        image = real_open(*args, **kwargs)
        opened.append(image.fp)  # the file object PIL reads from
        return image

    monkeypatch.setattr(Image, "open", recording_open)
    terrain, height, segmentation = explore.read_sample(dataset.catalog.iloc[4])
    assert len(opened) == 3 and all(file.closed for file in opened)
    assert terrain.dtype == np.uint8 and terrain.shape == (SIZE, SIZE, 3)
    assert (terrain == sample_colour(4)).all()
    assert height.dtype == np.uint16 and height.shape == (SIZE, SIZE)
    np.testing.assert_array_equal(height[0], np.linspace(1000, 60000, SIZE).astype(np.uint16))
    assert segmentation.dtype == np.uint8 and (segmentation == PALETTE[4]).all()

    # A PNG cut off mid-data: a clear error, and its file is closed on the way out too.
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "whole.png")
    whole = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[:len(whole) // 2])
    row = dataset.catalog.iloc[4].copy()
    row["terrain"] = str(tmp_path / "cut.png")
    opened.clear()
    with pytest.raises(explore.DataError, match="sample 0005.*cmc-kit validate"):
        explore.read_sample(row)
    assert len(opened) == 1 and opened[0].closed


def test_marker_colours(dataset):
    table = dataset.table
    by_class = explore.marker_colours(table, "dominant_class")
    assert by_class["color"][:7] == [f"rgb({r},{g},{b})" for r, g, b in PALETTE]
    assert [name for name, _ in by_class["legend"]] == list(CLASS_NAMES)
    by_height = explore.marker_colours(table, "height_mean")
    assert by_height["color"] == list(table["height_mean"]) and by_height["showscale"]
    by_hemisphere = explore.marker_colours(table, "hemisphere")
    colours = dict(zip(table["hemisphere"], by_hemisphere["color"]))
    assert len(set(colours.values())) == 2
    assert all(colours[h] == c for h, c in zip(table["hemisphere"], by_hemisphere["color"]))
    options = explore.colour_options(table)
    assert options[0] == "dominant_class" and "fraction_water" in options
    assert "hemisphere" in options and "dominant_class_id" not in options
    with pytest.raises(explore.CmcKitError, match="no such column"):
        explore.marker_colours(table, "nope")


# -- notebook explorer -----------------------------------------------------------------------

@pytest.fixture
def explorer(dataset):
    return explore.Explorer(dataset.table, dataset.catalog, layout=dataset.layout, thumb_size=16,
                            grid_thumb=8, max_grid=4)


def test_hover_and_click_show_that_samples_thumbnails_and_metadata(explorer):
    explorer.on_hover([3])
    assert_solid(explorer.sample_images["terrain"].value, sample_colour(3), tolerance=6)
    assert_solid(explorer.sample_images["segmentation"].value, PALETTE[3], tolerance=0)
    assert decoded(explorer.sample_images["height"].value).shape == (16, 16, 3)
    assert "0004" in explorer.sample_info.value and "hills" in explorer.sample_info.value
    explorer.on_click([9, 2])  # the first point under the cursor wins
    assert_solid(explorer.sample_images["terrain"].value, sample_colour(9), tolerance=6)
    assert "0010" in explorer.sample_info.value
    explorer.on_hover([])  # moving off the points keeps the last sample
    assert "0010" in explorer.sample_info.value


def test_lasso_selection_shows_a_grid_of_terrains(explorer):
    explorer.on_select([1, 4, 7])
    assert len(explorer.selection_grid.children) == 3
    for image, index in zip(explorer.selection_grid.children, [1, 4, 7]):
        assert_solid(image.value, sample_colour(index), tolerance=6)
    assert "3 selected" in explorer.selection_info.value
    explorer.on_select(list(range(10)))  # more than max_grid=4
    assert len(explorer.selection_grid.children) == 4
    assert "10 selected" in explorer.selection_info.value
    assert "first 4" in explorer.selection_info.value
    explorer.on_select([])
    assert explorer.selection_grid.children == () and explorer.selection_info.value == ""


def test_colour_by_dropdown_updates_marker_colours(explorer, dataset):
    marker = explorer.figure.data[0].marker
    assert list(marker.color) == explore.marker_colours(dataset.table, "dominant_class")["color"]
    explorer.controls["colour_by"].value = "height_mean"
    marker = explorer.figure.data[0].marker
    np.testing.assert_allclose(marker.color, dataset.table["height_mean"])
    assert marker.showscale
    explorer.set_colour_by("fraction_water")
    np.testing.assert_allclose(explorer.figure.data[0].marker.color,
                               dataset.table["fraction_water"])
    assert explorer.controls["colour_by"].value == "fraction_water"


def test_umap_controls_recompute_the_layout(explorer, dataset, monkeypatch):
    calls = []

    def fake_umap(embeddings, **settings):
        calls.append(settings)
        return np.full((len(embeddings), settings["n_components"]), len(calls), np.float32)

    monkeypatch.setattr(embed, "umap_layout", fake_umap)
    explorer.controls["n_neighbors"].value = 5
    assert calls[-1]["n_neighbors"] == 5 and calls[-1]["n_components"] == 2
    np.testing.assert_array_equal(explorer.figure.data[0].x, np.full(N, 1.0))
    explorer.controls["min_dist"].value = 0.5
    assert calls[-1]["min_dist"] == 0.5 and calls[-1]["n_neighbors"] == 5
    explorer.controls["dimensions"].value = 3
    trace = explorer.figure.data[0]
    assert trace.type == "scatter3d" and len(trace.z) == N
    # Colouring and callbacks survive the new figure.
    explorer.on_hover([5])
    assert_solid(explorer.sample_images["terrain"].value, sample_colour(5), tolerance=6)


def test_run_controls_re_embed_with_the_chosen_checkpoint(dataset, monkeypatch):
    requests = []

    def fake_embed_run(run, data=None, **options):
        assert data is None and options.pop("dataset").root == dataset.root  # found once
        requests.append(options)
        table = dataset.table.iloc[:6].copy()
        return table

    monkeypatch.setattr(embed, "embed_run", fake_embed_run)
    checkpoints = [{"path": "RUN/checkpoints/ckpt-10", "epoch": 1, "step": 10},
                   {"path": "RUN/checkpoints/ckpt-20", "epoch": 2, "step": 20}]
    explorer = explore.Explorer(dataset.table, dataset.catalog, layout=dataset.layout,
                                run="RUN", data=dataset.root, checkpoints=checkpoints,
                                thumb_size=16)
    monkeypatch.setattr(embed, "umap_layout",
                        lambda e, **s: np.zeros((len(e), s["n_components"]), np.float32))
    labels = [label for label, _ in explorer.controls["checkpoint"].options]
    assert labels == ["latest", "epoch 1 / step 10", "epoch 2 / step 20"]
    explorer.controls["checkpoint"].value = "RUN/checkpoints/ckpt-10"
    assert requests[-1]["checkpoint"] == "RUN/checkpoints/ckpt-10"
    assert len(explorer.figure.data[0].x) == 6
    explorer.controls["network"].value = "momentum"
    assert requests[-1]["network"] == "momentum"
    assert requests[-1]["checkpoint"] == "RUN/checkpoints/ckpt-10"
    explorer.controls["network"].value = "online"  # seen before: cached, no new embedding
    assert len(requests) == 2


def test_without_a_kernel_display_falls_back_to_a_static_figure(explorer, monkeypatch):
    import plotly.graph_objects as go
    from IPython import display as ipython_display

    shown = []
    monkeypatch.setattr(ipython_display, "display", lambda *objects: shown.extend(objects))
    explorer._ipython_display_()  # pytest is no Jupyter kernel
    assert any("Static view" in getattr(item, "data", "") for item in shown)
    figures = [item for item in shown if isinstance(item, go.Figure)]
    assert len(figures) == 1 and len(figures[0].data[0].x) == N
    assert explore.widgets_can_render() is False


def test_explorer_rejects_tables_that_do_not_match_the_catalog(dataset):
    with pytest.raises(explore.DataError, match="not in the catalog"):
        explore.Explorer(dataset.table, dataset.catalog.iloc[:3], layout=dataset.layout)
    with pytest.raises(explore.CmcKitError, match="layout"):
        explore.Explorer(dataset.table, dataset.catalog, layout=dataset.layout[:5])


# -- mosaic ------------------------------------------------------------------------------------

def test_mosaic_places_thumbnails_at_their_cells(dataset, tmp_path):
    # Corners and centre of a 4 x 4 grid of 8 px cells.
    layout = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [0.5, 0.5]], dtype=np.float32)
    ids = list(dataset.catalog["id"][:5])
    out = explore.mosaic(layout, tmp_path / "m.png", catalog=dataset.catalog, canvas=32, thumb=8,
                         ids=ids)
    picture = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert picture.shape == (32, 32, 3)
    expected = {(31, 0): 0, (31, 31): 1, (0, 0): 2, (0, 31): 3, (20, 12): 4}  # (row, col) pixel
    for (row, col), index in expected.items():
        np.testing.assert_array_equal(picture[row, col], sample_colour(index))
    np.testing.assert_array_equal(picture[4, 12], (24, 24, 24))  # an empty cell


def test_mosaic_keeps_one_thumbnail_per_cell_for_any_size(tmp_path):
    count, thumb = 3000, 16
    rng = np.random.default_rng(0)
    layout = rng.normal(size=(count, 2))
    colours = rng.integers(0, 256, size=(count, 3), dtype=np.uint8)
    thumbs = {}
    for i in range(count):
        buffer = io.BytesIO()
        Image.fromarray(np.full((thumb, thumb, 3), colours[i])).save(buffer, format="PNG")
        thumbs[f"s{i}"] = {"terrain": buffer.getvalue()}
    out = explore.mosaic(layout, tmp_path / "big.png", thumbnails=thumbs, canvas=128, thumb=thumb)
    picture = np.asarray(Image.open(out).convert("RGB"))
    assert picture.shape == (128, 128, 3)
    # Every occupied cell is one solid thumbnail (no overlap), and its colour is a sample's.
    known = {tuple(c) for c in colours}
    cells = picture.reshape(8, thumb, 8, thumb, 3).transpose(0, 2, 1, 3, 4).reshape(64, -1, 3)
    occupied = 0
    for cell in cells:
        assert (cell == cell[0]).all()
        if tuple(cell[0]) != (24, 24, 24):
            occupied += 1
            assert tuple(cell[0]) in known
    assert 30 < occupied <= 64  # Gaussian cloud: most cells near the centre are filled


# -- feature maps --------------------------------------------------------------------------------

class PlantedStages:
    """stage_features returns maps with a dominant planted direction, so PC1 is known."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.strong, self.weak = rng.normal(size=(2, 12))
        self.rng = rng

    def stage_features(self, x, view="terrain"):
        samples = len(x)
        a = self.rng.normal(size=(samples, 5, 5, 1)) * 10
        b = self.rng.normal(size=(samples, 5, 5, 1)) * 2
        noise = self.rng.normal(size=(samples, 5, 5, 12)) * 0.1
        self.a = a[..., 0]
        return [np.zeros((samples, 10, 10, 4)), a * self.strong + b * self.weak + noise]


def test_feature_map_pca_recovers_the_dominant_direction():
    encoder = PlantedStages()
    batch = {"terrain": np.random.default_rng(1).uniform(-1, 1, size=(6, 20, 20, 3))}
    maps = explore.feature_maps(encoder, batch, samples=4)
    assert maps.rgb.shape == (4, 5, 5, 3) and maps.inputs.shape == (4, 20, 20, 3)
    assert maps.inputs.dtype == np.uint8
    assert maps.rgb.min() >= 0 and maps.rgb.max() <= 1
    np.testing.assert_allclose(maps.rgb.reshape(-1, 3).min(0), 0, atol=1e-6)
    np.testing.assert_allclose(maps.rgb.reshape(-1, 3).max(0), 1, atol=1e-6)
    ratio = maps.explained_variance_ratio
    assert ratio[0] > ratio[1] > ratio[2] and ratio[0] > 0.8
    correlation = np.corrcoef(maps.rgb[..., 0].ravel(), encoder.a.ravel())[0, 1]
    assert abs(correlation) > 0.99
    assert len(maps.figure.data) == 8  # input and PCA panel per sample
    with pytest.raises(explore.CmcKitError, match="out of range"):
        explore.feature_maps(encoder, batch, stage=5)


def test_pca_rgb_matches_sklearn():
    from sklearn.decomposition import PCA

    features = np.random.default_rng(2).normal(size=(3, 4, 4, 9)) * np.arange(1, 10)
    rgb, ratio = explore.pca_rgb(features)
    reference = PCA(n_components=3).fit(features.reshape(-1, 9))
    np.testing.assert_allclose(ratio, reference.explained_variance_ratio_, rtol=1e-6)
    projected = reference.transform(features.reshape(-1, 9))
    for k in range(3):  # same component up to sign, after min-max scaling
        assert abs(np.corrcoef(rgb.reshape(-1, 3)[:, k], projected[:, k])[0, 1]) > 0.999999


def test_feature_maps_of_the_real_encoder():
    from cmc_kit import models
    from cmc_kit.config import ModelConfig

    encoder = models.build_encoder(ModelConfig(views=("terrain", "height"), trunk="original",
                                               width=0.125, embedding_dim=8), crop_size=32)
    x = np.random.default_rng(0).uniform(-1, 1, size=(2, 32, 32, 3)).astype(np.float32)
    maps = explore.feature_maps(encoder, {"terrain": x}, stage=-1, samples=2)
    assert maps.rgb.shape[0] == 2 and maps.rgb.shape[-1] == 3
    assert 0 <= maps.rgb.min() and maps.rgb.max() <= 1
    np.testing.assert_array_equal(maps.inputs, ((x + 1) * 127.5).round().astype(np.uint8))


# -- standalone page -------------------------------------------------------------------------------

@pytest.fixture
def page_path(dataset, tmp_path):
    return explore.write_explorer_html(dataset.table, dataset.layout,
                                       tmp_path / "out" / "explorer.html",
                                       catalog=dataset.catalog, title="Test <page>", thumb=16)


def test_page_is_self_contained(page_path):
    assert [p.name for p in page_path.parent.iterdir()] == ["explorer.html"]  # no temp left
    text = page_path.read_text(encoding="utf-8")
    tags = re.findall(r"<script[^>]*>", text)
    assert len(tags) >= 2 and not any("src=" in tag for tag in tags)  # Plotly JS inlined
    assert len(text) > 3_000_000  # ... the whole plotly.min.js
    payload = json.loads(re.search(r'<script type="application/json" id="cmc-data">(.*?)</script>',
                                   text, re.S).group(1))
    assert payload["ids"] == [f"{i + 1:04d}" for i in range(N)]
    assert all(uri.startswith("data:image/jpeg;base64,") for uri in payload["thumbs"]["terrain"])
    assert all(uri.startswith("data:image/jpeg;base64,") for uri in payload["thumbs"]["height"])
    assert all(uri.startswith("data:image/png;base64,")
               for uri in payload["thumbs"]["segmentation"])
    terrain_6 = base64.b64decode(payload["thumbs"]["terrain"][6].split(",", 1)[1])
    assert_solid(terrain_6, sample_colour(6), tolerance=6)
    segmentation_6 = base64.b64decode(payload["thumbs"]["segmentation"][6].split(",", 1)[1])
    assert_solid(segmentation_6, PALETTE[6], tolerance=0)
    row_6 = dict(zip(payload["columns"], payload["meta"][6]))
    assert row_6["dominant_class"] == "tundra" and row_6["height_mean"] == 600
    assert "Test &lt;page&gt;" in text
    for option in ("dominant_class", "height_mean", "hemisphere"):
        assert f'<option value="{option}">' in text


def test_page_and_mosaic_take_the_catalog_or_the_thumbnails_by_name(dataset, tmp_path):
    thumbs = explore.make_thumbnails(dataset.catalog, size=16, detail_size=12)
    from_catalog = explore.write_explorer_html(dataset.table, dataset.layout, tmp_path / "a.html",
                                               catalog=dataset.catalog, thumb=16)
    from_thumbs = explore.write_explorer_html(dataset.table, dataset.layout, tmp_path / "b.html",
                                              thumbnails=thumbs, thumb=16)
    assert from_catalog.read_bytes() == from_thumbs.read_bytes()
    for kwargs in ({}, {"catalog": dataset.catalog, "thumbnails": thumbs}):
        with pytest.raises(explore.CmcKitError, match="exactly one"):
            explore.write_explorer_html(dataset.table, dataset.layout, tmp_path / "c.html",
                                        **kwargs)
        with pytest.raises(explore.CmcKitError, match="exactly one"):
            explore.mosaic(dataset.layout, tmp_path / "c.png", **kwargs)
    assert not list(tmp_path.glob("c.*"))
    with pytest.raises(explore.DataError, match="No thumbnails.*thumbnails="):
        explore.write_explorer_html(dataset.table, dataset.layout, tmp_path / "d.html",
                                    thumbnails={"0001": thumbs["0001"]})


def test_export_html_embeds_a_run_and_caches_its_layout(dataset, tmp_path, monkeypatch):
    seen = {}

    def fake_embed_run(run, data=None, **options):
        seen.update(options)
        table = dataset.table.copy()
        table.attrs["epoch"] = 4
        return table

    monkeypatch.setattr(embed, "embed_run", fake_embed_run)
    from cmc_kit import data

    walks = []
    monkeypatch.setattr(data, "discover", lambda root: walks.append(root) or dataset.catalog)
    run = tmp_path / "run"
    out = explore.export_html(run, dataset.root, tmp_path / "page.html", thumb=16, progress=False)
    assert seen["split"] == "all"
    assert walks == [dataset.root]  # the data folder is walked once, the embedding gets it found
    assert seen["dataset"].catalog is dataset.catalog
    assert out.is_file() and "epoch 4" in out.read_text()
    assert len(list((run / "umap_cache").glob("umap-*.npy"))) == 1


@pytest.mark.browser
def test_page_works_in_headless_chromium(page_path, browser, tmp_path):
    errors = []
    page = browser.new_page(viewport={"width": 1200, "height": 700})
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(Path(page_path).as_uri())
    page.wait_for_function("document.getElementById('cmc-plot') && "
                           "document.getElementById('cmc-plot').calcdata")
    # Move the mouse onto point 7, as a person would.
    x, y = page.evaluate("""() => {
        const gd = document.getElementById('cmc-plot'), fl = gd._fullLayout;
        const box = gd.getBoundingClientRect(), p = gd.calcdata[0][7];
        return [box.left + fl._size.l + fl.xaxis.d2p(p.x),
                box.top + fl._size.t + fl.yaxis.d2p(p.y)]; }""")
    page.mouse.move(x, y)
    page.wait_for_selector("#cmc-sample img")
    sources = page.eval_on_selector_all("#cmc-sample img", "els => els.map(e => e.src)")
    assert len(sources) == 3 and all(s.startswith("data:image/") for s in sources)
    assert page.inner_text("#cmc-sample-id") == "0008"
    page.screenshot(path=str(tmp_path / "hover.png"))

    def point_fill():
        return page.evaluate("document.querySelectorAll('.scatterlayer .point')[7]"
                             ".style.fill")

    before = point_fill()
    assert before.replace(" ", "") == "rgb({},{},{})".format(*PALETTE[0])  # water
    page.select_option("#cmc-colour-by", "height_mean")
    page.wait_for_function("document.getElementById('cmc-plot')._fullData[0]"
                           ".marker.showscale === true")
    assert point_fill() != before
    colours = page.evaluate("Array.from(document.getElementById('cmc-plot')"
                            "._fullData[0].marker.color)")
    np.testing.assert_allclose(colours, np.arange(N) * 100)

    # A lasso selection fills the grid with the selected terrains.
    page.evaluate("""() => document.getElementById('cmc-plot').emit('plotly_selected',
        {points: [{curveNumber: 0, pointNumber: 2}, {curveNumber: 0, pointNumber: 5}]})""")
    assert page.eval_on_selector_all("#cmc-grid img", "els => els.map(e => e.title)") \
        == ["0003", "0006"]
    assert errors == []


# -- the embedding over epochs ----------------------------------------------------------------------

def test_align_layout_undoes_rotation_mirror_scale_and_shift():
    rng = np.random.default_rng(3)
    reference = rng.normal(size=(30, 2))
    angle = 0.9
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = 3.0 * reference @ rotation @ np.diag([1.0, -1.0]) + [5.0, -2.0]
    np.testing.assert_allclose(explore.align_layout(moved, reference), reference, atol=1e-5)
    # On an unrelated layout it is still only a similarity transform, it takes the reference's
    # spread (no shrinking towards a dot), and no other rotation or mirror fits better.
    other = rng.normal(size=(30, 2)) * [4.0, 0.5]
    aligned = explore.align_layout(other, reference)
    ratio = pairwise(aligned) / np.where(pairwise(other) > 0, pairwise(other), 1)
    off_diagonal = ~np.eye(30, dtype=bool)
    np.testing.assert_allclose(ratio[off_diagonal], ratio[off_diagonal][0], rtol=1e-4)

    def spread(points):
        return np.sqrt(((points - points.mean(0)) ** 2).sum())

    assert spread(aligned) == pytest.approx(spread(reference), rel=1e-5)
    residual = ((aligned - reference) ** 2).sum()
    for turn in np.linspace(0, 2 * np.pi, 73):
        for mirror in (1.0, -1.0):
            rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
            candidate = (aligned - aligned.mean(0)) @ rotation @ np.diag([1.0, mirror])
            assert residual <= ((candidate + reference.mean(0) - reference) ** 2).sum() + 1e-4
    with pytest.raises(Exception, match="same shape"):
        explore.align_layout(other[:5], reference)


def pairwise(points):
    return np.linalg.norm(points[:, None, :] - points[None, :, :], axis=-1)


@pytest.fixture
def epoch_run(dataset, tmp_path):
    """A run folder with three epoch tables whose embeddings drift, as the trainer writes them."""
    run = tmp_path / "epoch_run"
    rng = np.random.default_rng(7)
    for epoch in (1, 2, 3):
        table = dataset.table.copy()
        drift = rng.normal(scale=0.3 * (4 - epoch), size=(N, 6))
        for k, column in enumerate(embed.embedding_columns(table)):
            table[column] = table[column] + drift[:, k]
        embed.save_table(table, run / "embeddings" / f"epoch_{epoch:03d}.parquet")
    return run


def test_embedding_over_epochs_animates_each_epoch_aligned_to_the_next(dataset, epoch_run):
    figure = explore.embedding_over_epochs(epoch_run, n_neighbors=5)
    assert [frame.name for frame in figure.frames] == ["epoch 1", "epoch 2", "epoch 3"]
    assert [step.label for step in figure.layout.sliders[0].steps] == ["1", "2", "3"]
    ids = list(dataset.table["id"])
    raw = [embed.umap_layout(embed.embedding_matrix(embed.load_table(path)), n_neighbors=5)
           for _, path in explore.epoch_tables(epoch_run)]
    frames = [np.column_stack([f.data[0].x, f.data[0].y]) for f in figure.frames]
    # The last epoch is the reference, as UMAP laid it out; the figure opens on it.
    np.testing.assert_allclose(frames[-1], raw[-1], atol=1e-6)
    np.testing.assert_allclose(figure.data[0].x, raw[-1][:, 0], atol=1e-6)
    for i in (0, 1):
        # Earlier frames: their own UMAP up to a similarity transform, fitted to the next frame.
        ratio = pairwise(frames[i]) / np.where(pairwise(raw[i]) > 0, pairwise(raw[i]), 1)
        off_diagonal = ~np.eye(N, dtype=bool)
        np.testing.assert_allclose(ratio[off_diagonal], ratio[off_diagonal][0], rtol=1e-3)
        np.testing.assert_allclose(frames[i], explore.align_layout(raw[i], frames[i + 1]),
                                   atol=1e-5)
    for frame in figure.frames:
        assert list(frame.data[0].ids) == ids  # object constancy: points glide, not jump
        expected = ["rgb({},{},{})".format(*PALETTE[k % 7]) for k in range(N)]
        assert list(frame.data[0].marker.color) == expected
    low, high = figure.layout.xaxis.range
    assert all(low <= x <= high for f in frames for x in f[:, 0])


def test_embedding_over_epochs_spreads_frames_and_keeps_common_samples(dataset, epoch_run):
    # An unreadable file dropped sample 0003 from epoch 2's table.
    path = epoch_run / "embeddings" / "epoch_002.parquet"
    table = embed.load_table(path)
    embed.save_table(table[table["id"] != "0003"], path)
    figure = explore.embedding_over_epochs(epoch_run, n_neighbors=5, max_frames=2)
    assert [frame.name for frame in figure.frames] == ["epoch 1", "epoch 3"]
    assert len(figure.frames[0].data[0].x) == N  # epoch 2 was not a frame
    figure = explore.embedding_over_epochs(epoch_run, n_neighbors=5)
    assert "0003" not in figure.frames[0].data[0].ids and len(figure.frames[0].data[0].x) == N - 1


def test_non_finite_embeddings_are_left_out_with_a_warning(dataset, epoch_run):
    path = epoch_run / "embeddings" / "epoch_002.parquet"
    table = embed.load_table(path)
    table.loc[table["id"] == "0004", "emb_0"] = np.nan
    embed.save_table(table, path)
    path = epoch_run / "embeddings" / "epoch_001.parquet"
    table = embed.load_table(path)
    table["emb_1"] = np.inf  # a whole epoch overflowed
    embed.save_table(table, path)
    with pytest.warns(UserWarning, match="epoch 1: all; epoch 2: 1"):
        figure = explore.embedding_over_epochs(epoch_run, n_neighbors=5)
    assert [frame.name for frame in figure.frames] == ["epoch 2", "epoch 3"]
    for frame in figure.frames:
        assert "0004" not in frame.data[0].ids and len(frame.data[0].ids) == N - 1
        assert np.isfinite(frame.data[0].x).all()


def test_an_epoch_table_that_cannot_be_read_is_left_out_with_a_warning(epoch_run):
    damaged = epoch_run / "embeddings" / "epoch_002.parquet"
    damaged.write_bytes(b"\xff\xfe\x00 not parquet")
    with pytest.warns(UserWarning, match=r"Epoch 2 is left out of the animation .*epoch_002"
                                         r"\.parquet cannot be read"):
        figure = explore.embedding_over_epochs(epoch_run, n_neighbors=5)
    assert [frame.name for frame in figure.frames] == ["epoch 1", "epoch 3"]
    assert damaged.read_bytes().startswith(b"\xff\xfe")  # left as it was


def test_embedding_over_epochs_without_tables_says_how_to_get_them(tmp_path):
    with pytest.raises(Exception, match="train.eval_subset"):
        explore.embedding_over_epochs(tmp_path / "empty_run")


@pytest.mark.browser
def test_epoch_animation_page_plays_in_headless_chromium(epoch_run, browser, tmp_path):
    figure = explore.embedding_over_epochs(epoch_run, n_neighbors=5)
    page_path = explore.write_epochs_html(epoch_run, tmp_path / "over_epochs.html", n_neighbors=5)
    first = np.column_stack([figure.frames[0].data[0].x, figure.frames[0].data[0].y])
    errors = []
    page = browser.new_page(viewport={"width": 800, "height": 700})
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(page_path.as_uri())
    page.wait_for_function("document.getElementById('epochs') && "
                           "document.getElementById('epochs').calcdata")
    page.wait_for_timeout(500)
    assert page.evaluate("document.getElementById('epochs')._fullLayout.title.text") \
        == "epoch 3"  # opens on the last epoch and stays there
    # Plotly rejects an interrupted animation's promise and nobody catches it (a slider
    # press interrupts the frame it re-selects): those show as 'undefined' page errors.
    page.evaluate("""() => { window.interrupted = 0; window.shownFrames = [];
        const gd = document.getElementById('epochs');
        gd.on('plotly_animationinterrupted', () => { window.interrupted += 1; });
        gd.on('plotly_animatingframe', e => window.shownFrames.push(e.name)); }""")
    # Play runs through every epoch from the first.
    page.get_by_text("play", exact=True).click()
    page.wait_for_function("window.shownFrames.length === 3", timeout=10_000)
    assert page.evaluate("window.shownFrames") == ["epoch 1", "epoch 2", "epoch 3"]
    page.wait_for_timeout(800)
    # Drag the slider's grip onto its first tick ("1"), as a person would.
    ticks = page.evaluate("""() => Array.from(document.querySelectorAll(
        '.slider-tick-rect')).map(e => { const r = e.getBoundingClientRect();
                                         return r.x + r.width / 2; })""")
    rail = page.locator(".slider-rail-rect").bounding_box()
    y = rail["y"] + rail["height"] / 2
    page.mouse.move(ticks[-1], y)  # the grip sits on the last epoch
    page.mouse.down()
    page.mouse.move(ticks[1], y, steps=4)
    page.mouse.move(ticks[0], y, steps=4)
    page.mouse.up()
    page.wait_for_function("document.getElementById('epochs')._fullLayout.title.text "
                           "=== 'epoch 1'")
    page.wait_for_timeout(800)  # the 300 ms transition
    shown = page.evaluate("""() => document.getElementById('epochs').calcdata[0]
                                  .map(point => [point.x, point.y])""")
    np.testing.assert_allclose(np.array(shown), first, rtol=1e-5, atol=1e-5)
    interrupted = page.evaluate("window.interrupted")
    assert [e for e in errors if e != "undefined"] == []
    assert errors.count("undefined") <= interrupted
