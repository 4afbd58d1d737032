"""Embeddings table, metadata, save/load and cached UMAP (cmc_kit.embed)."""

import types

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cmc_kit import CLASS_NAMES, PALETTE, data, embed, features, layout

SIZE, CROP = 32, 16  # image side, centre crop side: the crop is [8:24, 8:24]
LO, HI = (SIZE - CROP) // 2, (SIZE + CROP) // 2


def write_sample_pngs(folder, index, rng):
    """One sample whose centre crop differs from its border, so crop statistics are checkable."""
    terrain = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    height = rng.integers(0, 65536, size=(SIZE, SIZE), dtype=np.uint16)
    centre_class, border_class, minor_class = index % 7, (index + 3) % 7, (index + 5) % 7
    classes = np.full((SIZE, SIZE), border_class, dtype=np.uint8)
    classes[LO:HI, LO:HI] = centre_class
    classes[LO:LO + 4, LO:HI] = minor_class  # a quarter of the crop
    sample_id = f"{index + 1:04d}"
    Image.fromarray(terrain).save(folder / f"{sample_id}_t.png")
    Image.fromarray(height).save(folder / f"{sample_id}_h.png")
    Image.fromarray(PALETTE[classes]).save(folder / f"{sample_id}_i2.png")
    return sample_id, terrain, height, classes


@pytest.fixture
def dataset(tmp_path):
    """Five samples as the Kaggle layout, with the arrays kept for reference values."""
    folder = tmp_path / "_dataset"
    folder.mkdir()
    rng = np.random.default_rng(0)
    samples = [write_sample_pngs(folder, i, rng) for i in range(5)]
    catalog = pd.DataFrame({
        "id": [s[0] for s in samples],
        "terrain": [str(folder / f"{s[0]}_t.png") for s in samples],
        "height": [str(folder / f"{s[0]}_h.png") for s in samples],
        "segmentation": [str(folder / f"{s[0]}_i2.png") for s in samples],
    })
    return types.SimpleNamespace(root=tmp_path, catalog=catalog, samples=samples)


class MeanColourEncoder:
    """Trunk features = channel means of the input; head = a fixed linear map of them."""

    def __init__(self, dim=4):
        self.projection = np.random.default_rng(1).normal(size=(3, dim)).astype(np.float32)
        self.calls = []

    def encode_features(self, x, view):
        self.calls.append(("trunk", view, tuple(np.shape(x))))
        return np.asarray(x).mean(axis=(1, 2))  # [B, C]

    def __call__(self, inputs):
        (view, x), = inputs.items()
        self.calls.append(("head", view, tuple(np.shape(x))))
        means = np.asarray(x).mean(axis=(1, 2))  # [B, C]
        return {view: means @ self.projection[:means.shape[1]]}  # [B, D]


def reference_rows(samples):
    """Independent numpy statistics of each sample's centre crop."""
    rows = []
    for sample_id, terrain, height, classes in samples:
        crop_classes = classes[LO:HI, LO:HI]
        crop_height = height[LO:HI, LO:HI].astype(np.float64)
        fractions = np.bincount(crop_classes.ravel(), minlength=7) / crop_classes.size
        rows.append({"id": sample_id,
                     "mean_colour": terrain[LO:HI, LO:HI].reshape(-1, 3).mean(0) / 127.5 - 1,
                     "fractions": fractions, "dominant": int(np.argmax(fractions)),
                     "height_mean": crop_height.mean(), "height_std": crop_height.std()})
    return rows


def test_trunk_embeddings_and_crop_metadata_match_numpy_reference(dataset):
    encoder = MeanColourEncoder()
    table = embed.compute_embeddings(encoder, dataset.catalog, view="terrain", source="trunk",
                                     crop_size=CROP, batch_size=2, progress=False)
    expected = reference_rows(dataset.samples)
    assert list(table["id"]) == [row["id"] for row in expected]  # catalog order, remainder kept
    assert embed.embedding_columns(table) == ["emb_0", "emb_1", "emb_2"]
    matrix = embed.embedding_matrix(table)
    assert matrix.dtype == np.float32 and matrix.shape == (5, 3)
    np.testing.assert_allclose(matrix, [row["mean_colour"] for row in expected], atol=1e-4)
    fractions = table[[f"fraction_{name}" for name in CLASS_NAMES]].to_numpy()
    np.testing.assert_allclose(fractions, [row["fractions"] for row in expected], atol=1e-6)
    assert list(table["dominant_class_id"]) == [row["dominant"] for row in expected]
    assert list(table["dominant_class"]) == [CLASS_NAMES[row["dominant"]] for row in expected]
    np.testing.assert_allclose(table["height_mean"], [r["height_mean"] for r in expected],
                               rtol=1e-4)
    np.testing.assert_allclose(table["height_std"], [r["height_std"] for r in expected],
                               rtol=1e-3)
    # The encoder saw only the terrain view, in batches of at most 2.
    assert {call[:2] for call in encoder.calls} == {("trunk", "terrain")}
    assert max(call[2][0] for call in encoder.calls) == 2


def test_grid_embeds_every_tile_with_its_own_crop_statistics(dataset):
    """grid 2 on 32 px images with 16 px crops: the four quadrants, row-major, each with the
    mean colour, class fractions and height of its own pixels."""
    encoder = MeanColourEncoder()
    table = embed.compute_embeddings(encoder, dataset.catalog, view="terrain", source="trunk",
                                     crop_size=CROP, batch_size=3, progress=False, grid=2)
    assert len(table) == 4 * len(dataset.samples) and table.attrs["grid"] == 2
    assert list(table["window"]) == [0, 1, 2, 3] * len(dataset.samples)
    corners = [(0, 0), (0, CROP), (CROP, 0), (CROP, CROP)]
    row = 0
    for sample_id, terrain, height, classes in dataset.samples:
        for top, left in corners:
            window = (slice(top, top + CROP), slice(left, left + CROP))
            fractions = np.bincount(classes[window].ravel(), minlength=7) / CROP ** 2
            got = table.iloc[row]
            assert got["id"] == sample_id
            np.testing.assert_allclose(embed.embedding_matrix(table)[row],
                                       terrain[window].reshape(-1, 3).mean(0) / 127.5 - 1,
                                       atol=1e-4)
            np.testing.assert_allclose(got[[f"fraction_{n}" for n in CLASS_NAMES]].to_numpy(float),
                                       fractions, atol=1e-6)
            assert got["dominant_class_id"] == int(np.argmax(fractions))
            assert got["height_mean"] == pytest.approx(height[window].astype(float).mean(),
                                                       rel=1e-4)
            row += 1


def test_head_source_uses_the_encoder_output_for_the_chosen_view(dataset):
    encoder = MeanColourEncoder(dim=5)
    table = embed.compute_embeddings(encoder, dataset.catalog, view="height", source="head",
                                     crop_size=CROP, batch_size=4, progress=False)
    expected_height = np.array([[r["height_mean"] / 32767.5 - 1]
                                for r in reference_rows(dataset.samples)])
    np.testing.assert_allclose(embed.embedding_matrix(table),
                               expected_height @ encoder.projection[:1], rtol=1e-3, atol=1e-4)
    assert {call[:2] for call in encoder.calls} == {("head", "height")}
    assert table.attrs["source"] == "head" and table.attrs["view"] == "height"


def test_metadata_csv_is_found_at_the_root_and_joined_by_id(dataset):
    metadata = pd.DataFrame({"id": [3, 1, 2, 5, 4],  # unpadded, shuffled
                             "roughness": [0.3, 0.1, 0.2, 0.5, 0.4],
                             "fraction_water": [9.0] * 5})
    metadata.to_csv(dataset.root / "metadata.csv", index=False)
    assert layout.find_metadata_csv(dataset.root) == dataset.root / "metadata.csv"
    assert layout.find_metadata_csv(dataset.root / "_dataset") == dataset.root / "metadata.csv"
    table = embed.compute_embeddings(MeanColourEncoder(), dataset.catalog, crop_size=CROP,
                                     batch_size=3, progress=False,
                                     metadata_csv=layout.find_metadata_csv(dataset.root))
    np.testing.assert_allclose(table["roughness"], [0.1, 0.2, 0.3, 0.4, 0.5])
    # The generator's whole-image fraction does not overwrite the crop's.
    assert (table["meta_fraction_water"] == 9.0).all()
    assert (table["fraction_water"] <= 1.0).all()


def test_missing_metadata_csv_is_none(tmp_path):
    assert layout.find_metadata_csv(tmp_path) is None


class TwoStageEncoder(MeanColourEncoder):
    """Stage maps: the input itself, and the input pooled 2x2 and squared."""

    def stage_features(self, x, view):
        x = np.asarray(x, np.float64)
        b, h, w, c = x.shape
        pooled = x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
        return [x, pooled ** 2]


def test_stage_sources_pool_mean_and_std_per_channel_of_the_activated_maps(dataset):
    from cmc_kit import views

    encoder = TwoStageEncoder()
    batch = next(iter(views.make_dataset(dataset.catalog, views=("terrain",), crop_size=CROP,
                                         batch_size=5, training=False, seed=0)))["terrain"]
    x = np.asarray(batch, np.float64)
    pooled = x.reshape(5, CROP // 2, 2, CROP // 2, 2, 3).mean(axis=(2, 4)) ** 2

    def reference(m):  # leaky ReLU 0.2, mean and std per channel, the block unit length
        a = np.maximum(m, 0) + 0.2 * np.minimum(m, 0)
        block = np.concatenate([a.mean(axis=(1, 2)), a.std(axis=(1, 2))], axis=1)
        return block / np.linalg.norm(block, axis=1, keepdims=True)

    stage1, stage2 = reference(x), reference(pooled)                                    # [5, 6]
    np.testing.assert_allclose(features.feature_vectors(encoder, batch, view="terrain",
                                                     source="stage1"), stage1, rtol=1e-5)
    np.testing.assert_allclose(features.feature_vectors(encoder, batch, view="terrain",
                                                     source="stages"),
                               np.concatenate([stage1, stage2], axis=1), rtol=1e-5)
    table = embed.compute_embeddings(encoder, dataset.catalog, source="stage2", crop_size=CROP,
                                     batch_size=2, progress=False)
    np.testing.assert_allclose(embed.embedding_matrix(table), stage2, rtol=1e-5)
    assert table.attrs["source"] == "stage2"
    with pytest.raises(embed.CmcKitError, match="has 2 stages"):
        features.feature_vectors(encoder, batch, view="terrain", source="stage3")
    with pytest.raises(embed.CmcKitError, match="stage<N>"):
        features.check_source("stage0")


def test_bad_arguments_name_the_setting(dataset):
    with pytest.raises(embed.CmcKitError, match="source"):
        embed.compute_embeddings(MeanColourEncoder(), dataset.catalog, source="neck", crop_size=8)
    with pytest.raises(embed.CmcKitError, match="view"):
        embed.compute_embeddings(MeanColourEncoder(), dataset.catalog, view="radar", crop_size=8)
    with pytest.raises(embed.DataError, match="empty"):
        embed.compute_embeddings(MeanColourEncoder(), dataset.catalog.iloc[:0], crop_size=8)


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_save_and_load_round_trip(tmp_path, suffix):
    matrix = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    table = embed.embeddings_frame(["0001", "0002", "0010", "0100"], matrix)
    table["dominant_class"] = ["water", "forest", "water", "tundra"]
    table.attrs["source"] = "trunk"
    path = embed.save_table(table, tmp_path / f"sub/table{suffix}")
    loaded = embed.load_table(path)
    assert list(loaded["id"]) == ["0001", "0002", "0010", "0100"]  # zero padding survives CSV
    np.testing.assert_array_equal(embed.embedding_matrix(loaded), matrix)
    assert embed.embedding_matrix(loaded).dtype == np.float32
    assert list(loaded["dominant_class"]) == list(table["dominant_class"])
    if suffix == ".parquet":
        assert loaded.attrs.get("source") == "trunk"


def test_save_and_load_reject_unknown_files(tmp_path):
    table = embed.embeddings_frame(["1"], np.zeros((1, 2)))
    with pytest.raises(embed.CmcKitError, match=r"\.parquet or \.csv"):
        embed.save_table(table, tmp_path / "table.xlsx")
    with pytest.raises(embed.DataError, match="cmc-kit embed"):
        embed.load_table(tmp_path / "missing.parquet")


def test_embed_run_uses_the_runs_split_network_and_checkpoint(dataset, monkeypatch):
    from cmc_kit.config import Config, DataConfig, ModelConfig

    requested = {}
    encoders = {"online": MeanColourEncoder(), "momentum": MeanColourEncoder()}

    class Handle:
        config = Config(data=DataConfig(crop_size=CROP, batch_size=2),
                        model=ModelConfig(views=("terrain", "height")))
        epoch, step = 3, 30

        def encoder(self, network):
            requested["network"] = network
            return encoders[network]

        def split(self, catalog):
            return {"train": catalog.iloc[:3], "validation": catalog.iloc[3:]}

    def load_run(run, checkpoint=None):
        requested["checkpoint"] = checkpoint
        return Handle()

    from cmc_kit import data, runs

    monkeypatch.setattr(runs, "load_run", load_run)
    monkeypatch.setattr(data, "discover", lambda root: dataset.catalog)

    table = embed.embed_run("RUN", dataset.root, split="validation", network="momentum",
                            checkpoint="ckpt-2", progress=False)
    assert list(table["id"]) == ["0004", "0005"]
    assert requested == {"network": "momentum", "checkpoint": "ckpt-2"}
    assert encoders["momentum"].calls and not encoders["online"].calls
    assert table.attrs["epoch"] == 3 and table.attrs["network"] == "momentum"

    everything = embed.embed_run("RUN", dataset.root, split="all", progress=False)
    assert sorted(everything["id"]) == list(dataset.catalog["id"])
    assert everything.set_index("id")["split"].to_dict() == {
        "0001": "train", "0002": "train", "0003": "train",
        "0004": "validation", "0005": "validation"}
    with pytest.raises(embed.CmcKitError, match="segmentation"):
        embed.embed_run("RUN", dataset.root, view="segmentation", progress=False)


# -- UMAP ----------------------------------------------------------------------------------------

def two_clusters(n_per_cluster=40, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(2, dim)) * 10
    points = np.concatenate([centres[k] + rng.normal(size=(n_per_cluster, dim)) for k in (0, 1)])
    return points.astype(np.float32), np.repeat([0, 1], n_per_cluster)


def test_umap_keeps_separated_clusters_apart():
    points, labels = two_clusters()
    layout = embed.umap_layout(points, n_neighbors=10, metric="euclidean")
    assert layout.shape == (80, 2) and layout.dtype == np.float32
    # Nearest neighbour in the layout has the same cluster label.
    distances = ((layout[:, None] - layout[None]) ** 2).sum(-1)
    np.fill_diagonal(distances, np.inf)
    assert (labels[distances.argmin(1)] == labels).mean() > 0.95


def test_umap_cache_skips_recomputation_and_keys_on_content_and_parameters(tmp_path, monkeypatch):
    import umap

    real_umap = umap.UMAP
    fits = []

    def counting_umap(**kwargs):
        fits.append(kwargs)
        return real_umap(**kwargs)

    monkeypatch.setattr(umap, "UMAP", counting_umap)
    points, _ = two_clusters(n_per_cluster=20)
    first = embed.umap_layout(points, cache_dir=tmp_path)
    again = embed.umap_layout(points.copy(), cache_dir=tmp_path)
    assert len(fits) == 1
    np.testing.assert_array_equal(first, again)
    embed.umap_layout(points, min_dist=0.5, cache_dir=tmp_path)  # new parameters
    embed.umap_layout(points[::-1], cache_dir=tmp_path)          # new content
    assert len(fits) == 3
    assert len(list(tmp_path.glob("umap-*.npy"))) == 3


@pytest.mark.parametrize("count", [1, 2, 3, 8, 14])
def test_umap_works_below_n_neighbors(count):
    points = np.random.default_rng(count).normal(size=(count, 8)).astype(np.float32)
    layout = embed.umap_layout(points, n_neighbors=15)
    assert layout.shape == (count, 2) and np.isfinite(layout).all()
    if count > 1:
        assert len(np.unique(layout.round(5), axis=0)) == count  # distinct positions


def test_umap_three_components():
    points, _ = two_clusters(n_per_cluster=15)
    assert embed.umap_layout(points, n_components=3).shape == (30, 3)


# -- with the real pipeline and encoder ------------------------------------------------------

def test_real_encoder_on_synthetic_data_matches_its_own_forward_pass(synthetic_root):
    from cmc_kit import models, views
    from cmc_kit.config import ModelConfig

    folder = synthetic_root / "_dataset"
    ids = sorted(p.name.split("_")[0] for p in folder.glob("*_t.png"))[:6]
    catalog = pd.DataFrame({"id": ids,
                            "terrain": [str(folder / f"{i}_t.png") for i in ids],
                            "height": [str(folder / f"{i}_h.png") for i in ids],
                            "segmentation": [str(folder / f"{i}_i2.png") for i in ids]})
    config = ModelConfig(views=("terrain", "height", "segmentation"), trunk="original",
                         width=0.125, embedding_dim=8)
    encoder = models.build_encoder(config, crop_size=32)
    metadata = layout.find_metadata_csv(synthetic_root)
    assert metadata is not None
    trunk = embed.compute_embeddings(encoder, catalog, crop_size=32, batch_size=4,
                                     progress=False, metadata_csv=metadata)
    head = embed.compute_embeddings(encoder, catalog, source="head", crop_size=32,
                                    batch_size=4, progress=False)
    # Reference: the encoder's full multi-view forward pass on the same centre crops.
    batch = next(iter(views.make_dataset(catalog, views=config.views, crop_size=32,
                                         batch_size=6, training=False, seed=0)))
    np.testing.assert_allclose(embed.embedding_matrix(head),
                               np.asarray(encoder(batch)["terrain"]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(embed.embedding_matrix(trunk),
                               np.asarray(encoder.encode_features(batch["terrain"])),
                               rtol=1e-4, atol=1e-5)
    assert head.shape[0] == trunk.shape[0] == 6
    assert embed.embedding_matrix(head).shape[1] == 8
    # Generator parameters from metadata.csv arrive, row-aligned by id.
    generated = pd.read_csv(metadata, dtype={"id": str}).set_index("id")
    extra = [c for c in generated.columns if not c.startswith("fraction_")]
    assert extra and set(extra) <= set(trunk.columns)
    np.testing.assert_allclose(trunk.set_index("id")[extra[0]],
                               generated.loc[list(trunk["id"]), extra[0]])
    fractions = trunk[list(embed.FRACTION_COLUMNS)].to_numpy()
    np.testing.assert_allclose(fractions.sum(axis=1), 1.0, atol=1e-5)


def test_view_names_and_height_scale_agree_with_the_views_module():
    from cmc_kit import views

    assert embed.EMBEDDABLE_VIEWS == tuple(views.VIEW_SPECS)
    raw = np.arange(0, 65536, dtype=np.uint16)[:, None]  # every 16-bit height [N, 1]
    expected = raw.astype(np.float32) / np.float32(embed.HEIGHT_SCALE) - np.float32(1.0)
    np.testing.assert_array_equal(views.normalise_height(raw).numpy(), expected)


def test_compiled_features_are_traced_once_and_equal_the_eager_ones(monkeypatch):
    import tensorflow as tf

    from cmc_kit import models
    from cmc_kit.config import ModelConfig

    traces = []
    real_function = tf.function

    def counting(fn, **kwargs):
        if "_network" not in getattr(fn, "__qualname__", ""):
            return real_function(fn, **kwargs)  # the layers' own tf.functions

        def traced(*args):
            traces.append(tuple(args[0].shape))  # runs only while tracing
            return fn(*args)
        return real_function(traced, **kwargs)

    monkeypatch.setattr(tf, "function", counting)
    encoder = models.build_encoder(ModelConfig(width=0.125, embedding_dim=8,
                                               views=("terrain", "height")), crop_size=32)
    eager = features.feature_function(encoder, view="terrain", source="stages", compile=False)
    rng = np.random.default_rng(0)
    # Batches of several sizes and crops of two sizes, as a last batch or another grid gives,
    # and a second feature function of the same encoder (as every epoch's embeddings make).
    for _ in range(2):
        compiled = features.feature_function(encoder, view="terrain", source="stages")
        for batch, side in ((4, 32), (3, 32), (2, 64), (5, 32)):
            x = rng.uniform(-1, 1, (batch, side, side, 3)).astype("float32")
            np.testing.assert_allclose(compiled(x), eager(x), rtol=1e-4, atol=1e-5)
    assert len(traces) == 1 and traces[0][-1] == 3, traces
    features.feature_function(encoder, view="terrain", source="trunk")(x)  # another source: traced
    assert len(traces) == 2


def test_the_compiled_functions_do_not_keep_an_encoder_alive():
    import gc
    import weakref

    from cmc_kit import models
    from cmc_kit.config import ModelConfig

    encoder = models.build_encoder(ModelConfig(width=0.125, embedding_dim=8,
                                               views=("terrain", "height")), crop_size=32)
    x = np.zeros((2, 32, 32, 3), np.float32)
    features.feature_function(encoder, view="terrain", source="stages")(x)
    assert encoder in features._COMPILED
    alive = weakref.ref(encoder)
    del encoder
    gc.collect()  # Keras layers hold reference cycles
    assert alive() is None  # and with it its entry in the cache
