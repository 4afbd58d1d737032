"""Several machines: MultiWorkerMirroredStrategy with real worker processes on 127.0.0.1.

Every training here runs in subprocesses: a multi-worker strategy must be built before
TensorFlow runs anything, once per process. Each launch picks free ports at run time, is
bounded in time and kills what it started (by pid) when something goes wrong.

The tiny run (crop 32, width 0.125, global batch 8: 4 per worker, 2 steps per epoch, a
checkpoint after every step) is trained three ways, with one device ("R") and two workers
("M") for the first epoch at the same time, then the second epoch crosswise: M on one
device, R on two workers (with worker 1 killed in the middle, and both restarted).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from cmc_kit.config import preset
from cmc_kit.errors import ConfigError, TrainingError

WORKER_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import tensorflow as tf
    from cmc_kit import training
    from cmc_kit.config import Config
    from cmc_kit.errors import CmcKitError

    data, run, config_path, epochs, seconds_per_batch = sys.argv[1:6]

    def slow_batches(dataset):
        # Each training batch takes this long to make (the test's window to kill a worker).
        def slow(batch):
            if "position" not in batch or not float(seconds_per_batch):
                return batch
            delayed = tf.numpy_function(
                lambda p: (time.sleep(float(seconds_per_batch)), p)[1], [batch["position"]],
                tf.int64, stateful=True)
            return {**batch, "position": tf.ensure_shape(delayed, batch["position"].shape)}
        return dataset.map(slow)

    config = Config.load(config_path).with_overrides({"train.epochs": int(epochs)})
    try:
        result = training.train(data, run, config, verbose=1, dataset_transform=slow_batches)
    except CmcKitError as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    print("RESULT " + json.dumps({"step": result.step, "epoch": result.epoch,
                                  "status": result.status}), flush=True)
""")


def tiny_config():
    return preset("cpu-demo").with_overrides({
        "data.crop_size": 32, "data.batch_size": 8, "data.validation_fraction": 0.2,
        "model.trunk": "resnet18", "model.width": 0.125, "model.embedding_dim": 16,
        "model.views": "terrain,height",
        "train.pairs": "full", "train.epochs": 1, "train.queue_multiplier": 1,
        "train.eval_subset": 4, "train.learning_rate": 1e-5, "train.checkpoint_every_steps": 1,
        "train.keep_checkpoints": 10, "train.log_every_steps": 1,
        "train.collective_timeout": 120})


# -- launching processes --------------------------------------------------------------------------

def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Launch:
    """Processes started together: one per command, each with its own TF_CONFIG (or none)."""

    def __init__(self, root: Path, name: str, commands: list[list[str]], *, cluster: bool):
        self.root, self.name = root, name
        self.logs = [root / f"{name}-{i}.log" for i in range(len(commands))]
        self.scratch = root / f"{name}-tmp"  # TMPDIR: where other workers' saves go
        self.scratch.mkdir()
        addresses = [f"127.0.0.1:{port}" for port in free_ports(len(commands))]
        self.processes = []
        for index, command in enumerate(commands):
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_NUM_INTRAOP_THREADS="1",
                       TF_NUM_INTEROP_THREADS="2", TMPDIR=str(self.scratch))
            env.pop("TF_CONFIG", None)
            if cluster:
                env["TF_CONFIG"] = json.dumps({"cluster": {"worker": addresses},
                                               "task": {"type": "worker", "index": index}})
            with open(self.logs[index], "w") as log:
                self.processes.append(subprocess.Popen(
                    command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True))

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            for process in self.processes:
                process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.name} did not finish within {timeout:.0f} s:\n{self.output()}")
        return [process.returncode for process in self.processes]

    def kill(self, index: int | None = None) -> None:
        for i, process in enumerate(self.processes):
            if (index is None or i == index) and process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()

    def output(self, index: int | None = None) -> str:
        chosen = range(len(self.logs)) if index is None else [index]
        return "\n".join(f"--- {self.logs[i].name}\n{self.logs[i].read_text()[-3000:]}"
                         for i in chosen)


def worker_command(script, data, run, config_path, epochs=1, seconds_per_batch=0.0):
    return [sys.executable, str(script), str(data), str(run), str(config_path), str(epochs),
            str(seconds_per_batch)]


def wait_for_step(run: Path, step: int, launch: Launch, timeout: float) -> None:
    """Returns once RUN/state.json says `step` (the chief writes it after each checkpoint)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads((run / "state.json").read_text())["step"] >= step:
                return
        except (OSError, ValueError, KeyError):
            pass
        if any(p.poll() is not None for p in launch.processes):
            break
        time.sleep(0.05)
    launch.kill()
    pytest.fail(f"{run} never reached step {step}:\n{launch.output()}")


# -- the runs -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs_on_two_workers(tmp_path_factory):
    from cmc_kit import synth

    root = tmp_path_factory.mktemp("multi_worker")
    data = synth.generate(root / "data", n=20, size=48, seed=3, progress=False)
    config_path = root / "config.json"
    tiny_config().save(config_path)
    script = root / "worker.py"
    script.write_text(WORKER_SCRIPT)
    launches = []
    try:
        # Epoch 1: one device and two workers, side by side.
        single = Launch(root, "single", [worker_command(script, data, root / "R", config_path)],
                        cluster=False)
        two = Launch(root, "two", [worker_command(script, data, root / "M", config_path)] * 2,
                     cluster=True)
        launches += [single, two]
        assert single.wait(400) == [0], single.output()
        assert two.wait(400) == [0, 0], two.output()
        # Epoch 2 crosswise: M on one device; R (a copy) on two workers, worker 1 killed after
        # the first step of the epoch, then both restarted with `cmc-kit train`.
        shutil.copytree(root / "R", root / "K")
        for name in ("M", "R"):  # frozen for the comparisons of epoch 1
            shutil.copytree(root / name, root / f"{name}-epoch1")
        resumed = Launch(root, "M-on-one", [worker_command(script, data, root / "M", config_path,
                                                           epochs=2)], cluster=False)
        killed = Launch(root, "K", [worker_command(script, data, root / "K", config_path,
                                                   epochs=2, seconds_per_batch=4)] * 2,
                        cluster=True)
        launches += [resumed, killed]
        wait_for_step(root / "K", 3, killed, timeout=400)
        killed.kill(index=1)
        killed_at = time.monotonic()
        survivor_rc = killed.wait(150)[0]
        survivor_seconds = time.monotonic() - killed_at
        restarted = Launch(root, "K-restarted", [
            [sys.executable, "-m", "cmc_kit", "train", "--data", str(data), "--run",
             str(root / "K")]] * 2, cluster=True)
        launches.append(restarted)
        assert resumed.wait(400) == [0], resumed.output()
        assert restarted.wait(400) == [0, 0], restarted.output()
    finally:
        for launch in launches:
            launch.kill()
    return {"root": root, "single": single, "two": two, "resumed": resumed, "killed": killed,
            "survivor_rc": survivor_rc, "survivor_seconds": survivor_seconds,
            "restarted": restarted}


def _checkpoint(run_dir, number):
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(run_dir / "checkpoints" / f"ckpt-{number}"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if not name.startswith(("_CHECKPOINTABLE", "save_counter/"))}


def _step_rows(run_dir) -> dict:
    import pandas as pd

    return {int(row["step"]): row for row in
            pd.read_csv(run_dir / "log_steps.csv").to_dict("records")}


def _assert_rows_match(one: dict, two: dict, steps, what: str) -> None:
    for step in steps:
        for name in ("loss", "accuracy", "inter_terrain-height", "intra_height-terrain"):
            assert two[step][name] == pytest.approx(one[step][name], rel=1e-4, abs=1e-5), \
                (what, step, name)


@pytest.mark.slow
def test_two_workers_split_the_global_batch_and_only_the_chief_writes(runs_on_two_workers):
    two = runs_on_two_workers["two"]
    assert "2 replica(s)" in two.output(0)
    assert "worker 0 of 2 (the chief, writes RUN)" in two.output(0)
    assert "worker 1 of 2 (writes nothing to RUN)" in two.output(1)
    for index in (0, 1):
        assert 'RESULT {"step": 2, "epoch": 1, "status": "completed"}' in two.output(index)
    # The other worker took part in every save, into temporary folders it removed again.
    assert list(two.scratch.iterdir()) == []
    run = runs_on_two_workers["root"] / "M-epoch1"
    assert sorted(p.name for p in (run / "checkpoints").glob("*.index")) == \
        ["ckpt-1.index", "ckpt-2.index"]
    assert json.loads((run / "state.json").read_text())["step"] == 2


@pytest.mark.slow
def test_two_workers_match_one_device_step_for_step(runs_on_two_workers):
    """Loss terms, online and momentum weights, Adam moments and queues after each step of
    the first epoch, against the same global batches on one device."""
    root = runs_on_two_workers["root"]
    single, two = root / "R-epoch1", root / "M-epoch1"
    _assert_rows_match(_step_rows(single), _step_rows(two), (1, 2), "epoch 1")
    for number in (1, 2):
        a, b = _checkpoint(single, number), _checkpoint(two, number)
        assert a.keys() == b.keys()
        groups = {"online/": 0, "momentum/": 0, "queues/": 0, "optimizer/": 0}
        for name in a:
            np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=2e-5,
                                       err_msg=f"ckpt-{number}: {name}")
            for prefix in groups:
                groups[prefix] += name.startswith(prefix)
        assert all(groups.values()), groups


@pytest.mark.slow
def test_a_killed_worker_stops_the_survivor_with_a_message(runs_on_two_workers):
    killed = runs_on_two_workers["killed"]
    assert runs_on_two_workers["survivor_rc"] == 2, killed.output(0)
    message = killed.output(0)
    assert "TrainingError: Worker 0 of 2 lost contact with the cluster (worker:1 stopped" in \
        message, message
    assert "at step 3; the latest checkpoint is" in message and "ckpt-3" in message
    assert "Restart every worker with the same command" in message
    # TensorFlow's heartbeats notice a dead peer in ~10 s; the test allows for a loaded box.
    assert runs_on_two_workers["survivor_seconds"] < 120


@pytest.mark.slow
def test_runs_resume_across_one_device_and_two_workers_exactly(runs_on_two_workers):
    """M (two workers) continued on one device and R (one device) continued on two workers,
    interrupted mid-epoch and restarted, end at the same place with the same steps."""
    root = runs_on_two_workers["root"]
    restarted = runs_on_two_workers["restarted"]
    assert "resumed at step 3" in restarted.output(0), restarted.output()
    assert "completed: epoch 2, step 4" in restarted.output(0)
    on_one, on_two = root / "M", root / "K"
    states = [json.loads((run / "state.json").read_text()) for run in (on_one, on_two)]
    for key in ("epoch", "step", "batch_in_epoch", "epoch_position", "queue_pointer",
                "queue_fill"):
        assert states[0][key] == states[1][key], key
    assert (states[1]["epoch"], states[1]["step"]) == (2, 4)
    # Step 4 ran after the restart from ckpt-3, in the middle of epoch 2.
    _assert_rows_match(_step_rows(on_one), _step_rows(on_two), (3, 4), "epoch 2")
    import pandas as pd
    log = pd.read_csv(on_two / "log.csv")
    assert list(log["epoch"]) == [1, 2]
    # `cmc-kit train`'s per-epoch embeddings ran on the chief, after the restart.
    assert (on_two / "embeddings" / "epoch_002.parquet").is_file()
    assert 0.0 <= log["knn_accuracy"].iloc[-1] <= 1.0


# -- TF_CONFIG, checked before anything starts ----------------------------------------------------

WORKERS = {"worker": ["127.0.0.1:2222", "127.0.0.1:2223"]}


@pytest.mark.parametrize("text, message", [
    ("{not json", "is not valid JSON"),
    ('["worker"]', "has no 'cluster'"),
    ('{"task": {"type": "worker", "index": 0}}', "has no 'cluster'"),
    (json.dumps({"cluster": WORKERS}), "has no 'task'"),
    (json.dumps({"cluster": WORKERS, "task": {"type": "worker", "index": 2}}),
     r"task index 2, out of range: job 'worker' has 2 task\(s\), indices 0-1"),
    (json.dumps({"cluster": WORKERS, "task": {"type": "worker", "index": "1"}}),
     "task index '1', not an integer"),
    (json.dumps({"cluster": WORKERS, "task": {"type": "chief", "index": 0}}),
     "task type 'chief', which is not a job of its cluster"),
    (json.dumps({"cluster": {"worker": ["127.0.0.1"]}, "task": {"type": "worker", "index": 0}}),
     "not 'host:port'"),
    (json.dumps({"cluster": {"worker": ["a:1", "a:1"]}, "task": {"type": "worker", "index": 0}}),
     "lists a:1 twice"),
    (json.dumps({"cluster": {**WORKERS, "ps": ["h:1"]}, "task": {"type": "worker", "index": 0}}),
     "parameter servers"),
    (json.dumps({"cluster": WORKERS, "task": {"type": "evaluator", "index": 0}}),
     "evaluator, which cmc_kit does not run"),
])
def test_malformed_tf_config_names_the_variable_and_the_problem(text, message):
    from cmc_kit.training import parse_tf_config

    with pytest.raises(ConfigError, match=message) as err:
        parse_tf_config(text)
    assert str(err.value).startswith("TF_CONFIG ")
    assert "\n" not in str(err.value)


def test_tf_config_places_the_chief_first():
    from cmc_kit.training import cluster, parse_tf_config

    vertex = {"cluster": {"chief": ["c:2222"], "worker": ["w0:2222", "w1:2222"]},
              "task": {"type": "worker", "index": 1}, "environment": "cloud", "job": {}}
    parsed = parse_tf_config(json.dumps(vertex))
    assert (parsed.num_workers, parsed.worker_index, parsed.is_chief) == (3, 2, False)
    assert (parsed.address, parsed.port, parsed.task) == ("w1:2222", 2222, "worker:1")
    chief = parse_tf_config(json.dumps({**vertex, "task": {"type": "chief", "index": 0}}))
    assert chief.is_chief and cluster.writes_run_directory(chief)
    assert not cluster.writes_run_directory(parsed)
    worker0 = parse_tf_config(json.dumps({"cluster": WORKERS,
                                          "task": {"type": "worker", "index": 0}}))
    assert worker0.is_chief and worker0.worker_index == 0
    alone = parse_tf_config(json.dumps({"cluster": {"chief": ["c:1"]},
                                        "task": {"type": "chief", "index": 0}}))
    assert alone.num_workers == 1 and cluster.writes_run_directory(alone)
    assert cluster.writes_run_directory(None)


def test_several_tasks_refuse_a_one_machine_strategy():
    from cmc_kit.training import parse_tf_config, select_strategy

    two = parse_tf_config(json.dumps({"cluster": WORKERS, "task": {"type": "worker", "index": 0}}))
    for name in ("default", "mirrored", "tpu"):
        with pytest.raises(ConfigError, match=f"train.strategy={name} trains on one machine"):
            select_strategy(name, two)


def test_a_port_in_use_is_named_before_tensorflow_starts():
    from cmc_kit.training import devices, parse_tf_config

    with socket.socket() as holder:
        holder.bind(("", 0))
        holder.listen()
        port = holder.getsockname()[1]
        taken = parse_tf_config(json.dumps({
            "cluster": {"worker": [f"127.0.0.1:{port}", "127.0.0.1:1"]},
            "task": {"type": "worker", "index": 0}}))
        with pytest.raises(ConfigError, match=rf"TF_CONFIG gives this task \(worker:0\) the "
                                              rf"address 127.0.0.1:{port}, but port {port} is "
                                              "already in use"):
            devices.check_port_free(taken)


def test_the_command_line_reports_a_bad_tf_config_in_one_line(tmp_path):
    env = dict(os.environ, TF_CONFIG='{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {}}')
    done = subprocess.run([sys.executable, "-m", "cmc_kit", "train", "--data", str(tmp_path),
                           "--run", str(tmp_path / "run")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(
        "cmc-kit train: error: TF_CONFIG has no 'task'"), done.stderr
    assert not (tmp_path / "run").exists()


# -- pieces on one worker -------------------------------------------------------------------------

def test_one_worker_splits_nothing_and_agrees_with_itself():
    import tensorflow as tf

    from cmc_kit.training import cluster

    workers = cluster.Workers(tf.distribute.get_strategy())
    assert (workers.index, workers.count, workers.is_chief, workers.describe()) == (0, 1, True, "")
    workers.agree({"anything": 3}, fix="")
    assert workers.any(True) and not workers.any(False)
    batches = tf.data.Dataset.range(8).map(
        lambda i: {"x": tf.fill([2], i), "position": 10 * i}).batch(4)
    seen = [{k: v.numpy().tolist() for k, v in batch.items()} for batch in
            cluster.distribute_batches(tf.distribute.get_strategy(), batches, 4, workers)]
    # Where the epoch continues after each batch: one past its last plan place, in every row.
    assert [b["resume_position"] for b in seen] == [[31] * 4, [71] * 4]
    assert all("position" not in b for b in seen)


def test_workers_that_disagree_all_stop_naming_what_differs():
    import tensorflow as tf

    from cmc_kit.training import cluster

    workers = cluster.Workers(tf.distribute.get_strategy())
    workers.index, workers.count = 1, 2
    mine = {"the checkpoint to resume from": 7, "the settings": 6, "the training samples": 9}
    workers.gather = lambda values: np.array([[7, 5, 9], values])  # the chief's row, then ours
    with pytest.raises(TrainingError, match=r"^The 2 workers do not agree on the settings: "
                                            r"worker\(s\) 1 differ from the chief \(this is "
                                            r"worker 1\)\. Run the same command\.$"):
        workers.agree(mine, fix="Run the same command.")
    workers.gather = lambda values: np.array([values, values])
    workers.agree(mine, fix="")  # the same everywhere: nothing to say


def test_every_worker_decides_resuming_before_the_chief_may_write_a_split(train_root, tmp_path,
                                                                           monkeypatch):
    """A slow worker must not take the split.json the chief writes for a new run for an old
    run's: "resuming" is decided between two barriers, and the chief writes after the second."""
    from cmc_kit.training import cluster, launch
    from helpers import tiny_config

    events = []
    monkeypatch.setattr(cluster.Workers, "barrier", lambda self: events.append("barrier"))
    has_split = launch._has_split
    monkeypatch.setattr(launch, "_has_split",
                        lambda run: events.append(f"resuming: {has_split(run)}") or has_split(run))
    write = launch.atomic_write_text
    monkeypatch.setattr(launch, "atomic_write_text",
                        lambda path, text: events.append(f"write {path.name}") or write(path, text))
    run = tmp_path / "run"
    for expected in ("resuming: False", "resuming: True"):
        events.clear()
        launch._prepare(train_root, None, run, tiny_config(), chief=True, tf_cluster=None,
                        fresh=False, resume_from=None, verbose=0)
        assert events[:3] == ["barrier", expected, "barrier"], events
        assert events.count("barrier") == 2 and ("write split.json" in events) == \
            (expected == "resuming: False"), events


class _TwoWorkers:
    index, count = 1, 2


def test_a_lost_peer_becomes_one_message_naming_it():
    import tensorflow as tf

    from cmc_kit.training import cluster

    heartbeat = ("Collective ops is aborted by: Error reported from /job:worker/task:0: The "
                 "following tasks are unhealthy (stopped sending heartbeats):\n"
                 "/job:worker/replica:0/task:0\nThe tasks have crashed. Check the task logs.")
    with pytest.raises(TrainingError, match=r"^Worker 1 of 2 lost contact with the cluster "
                                            r"\(worker:0 stopped: crashed, killed or preempted "
                                            r"\(see its log\)\) at step 7\. Restart every"):
        with cluster.lost_workers_explained(_TwoWorkers(), lambda: "at step 7", 60):
            raise tf.errors.UnavailableError(None, None, heartbeat)
    with pytest.raises(TrainingError, match=r"within train.collective_timeout \(60 s\)"):
        with cluster.lost_workers_explained(_TwoWorkers(), lambda: "at step 7", 60):
            raise tf.errors.DeadlineExceededError(None, None, "Collective ops timed out")
