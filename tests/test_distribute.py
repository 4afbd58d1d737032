"""tf.distribute: MirroredStrategy over two logical CPUs matches one device, step for step.

The CPU is split into two logical devices, which must happen before TensorFlow initialises,
so the training runs in a subprocess (`DISTRIBUTED_SCRIPT`); this process compares the
checkpoints and per-step logs it leaves behind.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cmc_kit.config import preset
from cmc_kit.errors import TrainingError


def tiny_config(**overrides):
    """ResNet-18, crop 32, width 0.125, global batch 8 (4 per replica), 3 steps per epoch, a checkpoint
    after every step. A small learning rate: Adam turns round-off in near-zero gradient
    entries into +-lr steps, which would swamp a multi-step comparison at lr 1e-3."""
    base = {
        "train.learning_rate": 1e-5,
        "data.crop_size": 32, "data.batch_size": 8, "data.validation_fraction": 0.2,
        "model.trunk": "resnet18", "model.width": 0.125, "model.embedding_dim": 16,
        "model.views": "terrain,height,segmentation", "train.pairs": "full",
        "train.epochs": 1, "train.queue_multiplier": 2, "train.eval_subset": 0,
        "train.checkpoint_every_steps": 1, "train.keep_checkpoints": 10,
    }
    base.update(overrides)
    return preset("cpu-demo").with_overrides(base)


# -- the global intra-batch loss, sharded by hand --------------------------------------------------

@pytest.mark.parametrize("kind", ["infonce", "nce"])
@pytest.mark.parametrize("replicas", [2, 4])
def test_sharded_intra_batch_loss_averages_to_the_whole_batch_loss(kind, replicas):
    from cmc_kit.objectives import contrastive_accuracy, intra_batch_loss

    rng = np.random.default_rng(replicas)
    query = rng.normal(size=(8, 6)).astype(np.float32)
    key = (query + 0.5 * rng.normal(size=(8, 6))).astype(np.float32)
    local = 8 // replicas
    shards = [slice(r * local, (r + 1) * local) for r in range(replicas)]
    sharded_loss = np.mean([float(intra_batch_loss(query[s], key, 0.1, kind, key_offset=s.start))
                            for s in shards])
    np.testing.assert_allclose(sharded_loss, float(intra_batch_loss(query, key, 0.1, kind)),
                               rtol=1e-5)
    sharded_accuracy = np.mean([float(contrastive_accuracy(query[s], key, key_offset=s.start))
                                for s in shards])
    assert sharded_accuracy == pytest.approx(float(contrastive_accuracy(query, key)))


def test_local_only_negatives_would_give_a_different_loss():
    """The property the distributed test relies on: local intra-batch negatives are not the
    global ones, so a replica that forgot the gather would be caught."""
    from cmc_kit.objectives import intra_batch_loss

    rng = np.random.default_rng(0)
    query, key = rng.normal(size=(2, 8, 6)).astype(np.float32)
    local_only = np.mean([float(intra_batch_loss(query[s], key[s], 0.1)) for s in
                          (slice(0, 4), slice(4, 8))])
    assert abs(local_only - float(intra_batch_loss(query, key, 0.1))) > 1e-2


def test_offset_outside_the_global_batch_is_rejected():
    from cmc_kit.objectives import intra_batch_loss

    query = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="key_offset must lie in"):
        intra_batch_loss(query, np.ones((8, 3), np.float32), key_offset=5)
    with pytest.raises(ValueError, match="at least as many rows"):
        intra_batch_loss(query, np.ones((2, 3), np.float32), key_offset=0)


def test_auto_strategy_on_a_plain_cpu_is_the_default_strategy():
    import tensorflow as tf

    from cmc_kit.training import select_strategy

    assert select_strategy("default") is tf.distribute.get_strategy()
    if not tf.config.list_logical_devices("GPU") and not tf.config.list_logical_devices("TPU"):
        assert select_strategy("auto").num_replicas_in_sync == 1


# -- mirrored training vs one device --------------------------------------------------------------

DISTRIBUTED_SCRIPT = textwrap.dedent("""
    import json, sys
    import tensorflow as tf

    # Two logical CPUs: must run before anything initialises TensorFlow.
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])

    from cmc_kit import training
    from cmc_kit.config import Config

    data, out, config_path = sys.argv[1], sys.argv[2], sys.argv[3]
    config = Config.load(config_path)

    class StepLog:
        def __init__(self):
            self.rows = []

        def on_train_batch_end(self, step, logs):
            self.rows.append({"step": step, **logs})

    def run(name, **overrides):
        log = StepLog()
        result = training.train(data, f"{out}/{name}", config.with_overrides(overrides),
                                verbose=1, callbacks=[log])
        return {"step": result.step, "rows": log.rows}

    report = {"replicas_mirrored": training.select_strategy("mirrored").num_replicas_in_sync}
    report["single"] = run("single", **{"train.strategy": "default"})
    report["mirrored"] = run("mirrored", **{"train.strategy": "mirrored"})
    # Continue both for a second epoch on one device: the mirrored run's checkpoint
    # must restore under the default strategy and carry on exactly like the straight run.
    report["single_continued"] = run("single", **{"train.strategy": "default", "train.epochs": 2})
    report["mirrored_resumed"] = run("mirrored", **{"train.strategy": "default", "train.epochs": 2})
    # Loss scaling (float16) under the mirrored strategy: the scale adapts, updates apply.
    report["mirrored_float16"] = run("mirrored_float16", **{
        "train.strategy": "mirrored", "train.mixed_precision": "mixed_float16",
        "train.epochs": 2, "train.learning_rate": 1e-3})
    # XLA per replica (forced on: the trainer uses it only with a GPU/TPU attached): the same
    # three steps as the single-device run, on the same training split.
    from cmc_kit import data as data_module
    from cmc_kit import runs
    split = runs.read_json(f"{out}/single/split.json")
    catalog = runs.apply_split(data_module.discover(data), split)["train"]
    trainer = training.Trainer(config.with_overrides({"train.strategy": "mirrored"}),
                               f"{out}/mirrored_xla", catalog, verbose=0, jit_compile=True)
    trainer.fill_queues()
    rows = []
    for batch in trainer.strategy.experimental_distribute_dataset(trainer.dataset(epoch=0)):
        rows.append({name: float(value) for name, value in trainer.train_step(batch).items()})
    report["mirrored_xla"] = {"jit_mode": trainer.jit_mode, "rows": rows}
    with open(f"{out}/report.json", "w") as handle:
        json.dump(report, handle)
""")


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory):
    from cmc_kit import synth

    root = tmp_path_factory.mktemp("distribute")
    data = synth.generate(root / "data", n=30, size=64, seed=3, progress=False)
    config_path = root / "config.json"
    tiny_config().save(config_path)
    script = root / "distributed.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    env = dict(os.environ, TF_NUM_INTRAOP_THREADS="2", TF_NUM_INTEROP_THREADS="2")
    done = subprocess.run([sys.executable, str(script), str(data), str(root), str(config_path)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    report = json.loads((root / "report.json").read_text())
    report["stdout"] = done.stdout
    return root, report


def _checkpoint(run_dir, step):
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(run_dir / "checkpoints" / f"ckpt-{step}"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if not name.startswith(("_CHECKPOINTABLE", "save_counter/"))}


def _assert_same_state(a, b, *, rtol, atol, what):
    assert a.keys() == b.keys(), f"{what}: different checkpoint contents"
    groups = {"online/": 0, "momentum/": 0, "queues/": 0, "optimizer/": 0}
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=rtol, atol=atol,
                                   err_msg=f"{what}: {name}")
        for prefix in groups:
            groups[prefix] += name.startswith(prefix)
    assert all(groups.values()), f"{what}: missing variable groups {groups}"


@pytest.mark.slow
def test_mirrored_runs_on_two_replicas(distributed_runs):
    _, report = distributed_runs
    assert report["replicas_mirrored"] == 2
    assert "2 replica(s)" in report["stdout"]
    assert report["single"]["step"] == report["mirrored"]["step"] == 3


@pytest.mark.slow
def test_mirrored_steps_match_one_device(distributed_runs):
    """Loss terms, accuracy, online weights, Adam moments (the summed gradients), momentum
    weights and queues after the first step and after three steps."""
    root, report = distributed_runs
    single, mirrored = report["single"]["rows"], report["mirrored"]["rows"]
    assert [r["step"] for r in single] == [r["step"] for r in mirrored] == [1, 2, 3]
    for one, two in zip(single, mirrored):
        assert one.keys() == two.keys()
        assert any(name.startswith("intra_") for name in one)
        for name in one:
            assert two[name] == pytest.approx(one[name], rel=1e-4, abs=1e-5), (one["step"], name)
    for step in (1, 3):
        _assert_same_state(_checkpoint(root / "single", step), _checkpoint(root / "mirrored", step),
                           rtol=1e-4, atol=2e-5, what=f"step {step}")


@pytest.mark.slow
def test_mirrored_checkpoint_resumes_on_one_device(distributed_runs):
    root, report = distributed_runs
    resumed, straight = report["mirrored_resumed"], report["single_continued"]
    assert resumed["step"] == straight["step"] == 6
    assert [r["step"] for r in resumed["rows"]] == [4, 5, 6]
    for one, two in zip(straight["rows"], resumed["rows"]):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-4, abs=1e-5)
    # The whole state after the first step on one device, which reads every restored variable.
    # Later steps are not compared weight by weight: a round-off difference of ~4e-6 between
    # two states (the replicas' summation order) measured to grow to ~2e-3 in an Adam moment
    # after one more step, the same in a fresh process (plausibly a leaky ReLU input near zero
    # changing side, which flips its slope), so a multi-step weight comparison tests luck.
    _assert_same_state(_checkpoint(root / "single", 4), _checkpoint(root / "mirrored", 4),
                       rtol=1e-4, atol=2e-5, what="first step after resuming")
    state = json.loads((root / "mirrored" / "state.json").read_text())
    assert state["epoch"] == 2 and state["queue_fill"] == state["queue_size"] == 16


@pytest.mark.slow
def test_mirrored_float16_with_loss_scaling_trains(distributed_runs):
    import tensorflow as tf

    root, report = distributed_runs
    rows = report["mirrored_float16"]["rows"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) for r in rows)
    reader = tf.train.load_checkpoint(str(root / "mirrored_float16" / "checkpoints" / "ckpt-6"))
    scale = float(reader.get_tensor("loss_scale/dynamic_scale/.ATTRIBUTES/VARIABLE_VALUE"))
    applied = int(reader.get_tensor(
        "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"))
    assert scale < 2.0 ** 15  # lowered from Keras's initial scale after overflowing steps
    assert 1 <= applied < 6  # the overflowing steps were skipped by the optimizer, the rest applied
    # Overflow steps are reported as skipped updates (no EMA or queue change), exactly those.
    assert sum(r["skipped"] for r in rows) == 6 - applied


@pytest.mark.slow
def test_mirrored_steps_compiled_per_replica_with_xla_match_one_device(distributed_runs):
    _, report = distributed_runs
    xla = report["mirrored_xla"]
    assert xla["jit_mode"] == "replica"
    single = report["single"]["rows"]
    assert len(xla["rows"]) == len(single) == 3
    for one, two in zip(single, xla["rows"]):
        for name in ("loss", "accuracy", "inter_terrain-height", "intra_terrain-height"):
            assert two[name] == pytest.approx(one[name], rel=1e-4, abs=1e-5), (one["step"], name)


# -- finding a TPU ----------------------------------------------------------------------------------

def test_tpu_addresses_prefer_a_named_tpu_then_locally_attached_chips(tmp_path):
    from cmc_kit.training import tpu_addresses_to_try

    no_devices = [str(tmp_path / "accel*")]
    assert tpu_addresses_to_try({}, no_devices) == [None]
    assert tpu_addresses_to_try({"TPU_NAME": "my-tpu"}, no_devices) == ["my-tpu"]
    # A TPU VM: chips show up as device files (Kaggle's v3-8: /dev/accel0..3).
    (tmp_path / "accel0").touch()
    assert tpu_addresses_to_try({}, [str(tmp_path / "accel*")]) == ["local", None]
    assert tpu_addresses_to_try({"TPU_ACCELERATOR_TYPE": "v5litepod-8"}, no_devices) == \
        ["local", None]
    assert tpu_addresses_to_try({"TPU_NAME": "my-tpu"}, [str(tmp_path / "accel*")]) == ["my-tpu"]


class _FakeResolver:
    """Stands in for TPUClusterResolver: only the addresses in `working` resolve."""

    working: tuple = ()
    tried: list = []

    def __init__(self, tpu=None):
        type(self).tried.append(tpu)
        if tpu not in self.working:
            raise ValueError(f"Please provide a TPU Name to connect to. ({tpu})")
        self.tpu = tpu


def test_connect_tpu_falls_back_through_the_addresses(monkeypatch):
    import tensorflow as tf

    from cmc_kit import training

    initialised = []
    monkeypatch.setattr(_FakeResolver, "working", ("local",))
    monkeypatch.setattr(_FakeResolver, "tried", [])
    monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver", _FakeResolver)
    monkeypatch.setattr(tf.config, "experimental_connect_to_cluster", lambda resolver: None)
    monkeypatch.setattr(tf.tpu.experimental, "initialize_tpu_system",
                        lambda resolver: initialised.append(resolver.tpu))
    monkeypatch.setattr(tf.distribute, "TPUStrategy", lambda resolver: ("strategy", resolver.tpu))

    strategy, errors = training.connect_tpu([None, "local"])
    assert strategy == ("strategy", "local")
    assert _FakeResolver.tried == [None, "local"] and initialised == ["local"]
    assert errors == ["tpu=None: Please provide a TPU Name to connect to. (None)"]

    # Nothing resolves: auto falls through to the default strategy, "tpu" says what it tried.
    monkeypatch.setattr(_FakeResolver, "working", ())
    monkeypatch.setattr(training.devices, "LOCAL_TPU_DEVICE_GLOBS", ())
    monkeypatch.delenv("TPU_NAME", raising=False)
    monkeypatch.delenv("TPU_ACCELERATOR_TYPE", raising=False)
    if not tf.config.list_logical_devices("GPU"):
        assert training.select_strategy("auto") is tf.distribute.get_strategy()
    with pytest.raises(TrainingError, match=r"tpu=None: Please provide.*TPU_NAME"):
        training.select_strategy("tpu")


def test_insisting_on_a_tpu_without_one_names_the_fix(monkeypatch):
    import tensorflow as tf

    from cmc_kit import training

    if tf.config.list_logical_devices("TPU"):
        pytest.skip("a TPU is attached")
    monkeypatch.setattr(training.devices, "LOCAL_TPU_DEVICE_GLOBS", ())
    monkeypatch.delenv("TPU_NAME", raising=False)
    monkeypatch.delenv("TPU_ACCELERATOR_TYPE", raising=False)
    with pytest.raises(TrainingError, match="train.strategy=tpu but no TPU"):
        training.select_strategy("tpu")
