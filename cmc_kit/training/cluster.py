"""Several machines: TF_CONFIG checked, this process's place among the workers, each worker's
share of a global batch, and what every worker must agree on.

As TensorFlow's tutorial `distribute/multi_worker_with_ctl` does it: TF_CONFIG is read once,
before the strategy is built (`devices.select_strategy`); every worker runs every step and
every save; only the chief writes the run directory. Every worker reads the same epoch plan
and keeps its own slice of each global batch, so every worker runs the same number of steps
(one step fewer anywhere and the others wait in a collective for ever).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import threading
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from cmc_kit.config import tf_config_text
from cmc_kit.errors import ConfigError, TrainingError

TRAINING_JOBS = ("chief", "worker")  # in TensorFlow's replica order: the chief's come first
EXAMPLE = ('{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
           '"task": {"type": "worker", "index": 0}}')
ADDRESS = re.compile(r"[^\s:]+:(\d+)|\[[0-9A-Fa-f:.]+\]:(\d+)")  # host:port or [ipv6]:port
# What a collective raises when a peer died (Unavailable: heartbeats stopped, connection
# reset), went silent past train.collective_timeout (DeadlineExceeded) or aborted the group.
PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
               tf.errors.CancelledError, tf.errors.AbortedError)


# -- TF_CONFIG ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class WorkerCluster:
    """A checked TF_CONFIG: the training tasks' addresses and this process's task."""

    jobs: tuple[tuple[str, tuple[str, ...]], ...]  # (("chief", ("h0:p",)), ("worker", (...)))
    task_type: str
    task_index: int

    def addresses(self, job: str) -> tuple[str, ...]:
        return dict(self.jobs).get(job, ())

    @property
    def num_workers(self) -> int:
        """Training tasks (chief and workers): the machines that each run the whole loop."""
        return sum(len(self.addresses(job)) for job in TRAINING_JOBS)

    @property
    def worker_index(self) -> int:
        """0 for the chief (or worker 0 without one), then the workers in order."""
        chiefs = len(self.addresses("chief")) if self.task_type == "worker" else 0
        return chiefs + self.task_index

    @property
    def is_chief(self) -> bool:
        """The task that writes the run directory: "chief" if the cluster has one (Vertex AI's
        worker pool 0), else worker 0."""
        return self.worker_index == 0

    @property
    def task(self) -> str:
        return f"{self.task_type}:{self.task_index}"

    @property
    def address(self) -> str:
        return self.addresses(self.task_type)[self.task_index]

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])


def parse_tf_config(text: str) -> WorkerCluster:
    """TF_CONFIG's JSON, checked; a ConfigError naming TF_CONFIG and what is wrong otherwise."""
    try:
        raw = json.loads(text)
    except ValueError as err:
        raise _bad(f"is not valid JSON ({err})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("cluster"), dict) or not raw["cluster"]:
        raise _bad("has no 'cluster' (job name -> list of 'host:port')")
    jobs = _checked_jobs(raw["cluster"])
    task_type, task_index = _checked_task(raw.get("task"), dict(jobs))
    return WorkerCluster(jobs, task_type, task_index)


def cluster_from_environment() -> WorkerCluster | None:
    """The checked TF_CONFIG of this process, None when it is not set."""
    text = tf_config_text()
    return None if text is None else parse_tf_config(text)


def writes_run_directory(cluster: WorkerCluster | None) -> bool:
    """False only for a worker other than the chief of a cluster of several: it trains, takes
    part in every save, and leaves the run directory to the chief."""
    return cluster is None or cluster.num_workers < 2 or cluster.is_chief


def _bad(what: str) -> ConfigError:
    return ConfigError(f"TF_CONFIG {what}. It should look like {EXAMPLE} (the same cluster on "
                       "every machine, each with its own task), or unset it to train on one "
                       "machine.")


def _checked_jobs(cluster: dict) -> tuple:
    if "ps" in cluster:
        raise _bad("names parameter servers ('ps'), which MultiWorkerMirroredStrategy does not "
                   "use: drop the 'ps' job (on Vertex AI, leave worker pool 2 empty)")
    if "master" in cluster:
        raise _bad("names a 'master' job (the old AI Platform name): call it 'chief'")
    unknown = sorted(set(cluster) - {*TRAINING_JOBS, "evaluator"})
    if unknown:
        raise _bad(f"names the unknown job(s) {', '.join(map(repr, unknown))}: only 'chief' and "
                   "'worker' train")
    jobs, seen = [], set()
    for job in TRAINING_JOBS:  # an evaluator is no part of the training cluster: ignored
        addresses = cluster.get(job)
        if addresses is None:
            continue
        if not isinstance(addresses, list) or not addresses:
            raise _bad(f"job {job!r} is not a list of 'host:port' addresses (received "
                       f"{addresses!r})")
        for address in addresses:
            match = ADDRESS.fullmatch(address) if isinstance(address, str) else None
            if match is None or not 0 < int(match.group(1) or match.group(2)) < 65536:
                raise _bad(f"job {job!r} has the address {address!r}, not 'host:port' with a "
                           "port in 1-65535")
            if address in seen:
                raise _bad(f"lists {address} twice: every task needs its own host:port")
            seen.add(address)
        jobs.append((job, tuple(addresses)))
    if not jobs:
        raise _bad("names no 'chief' or 'worker' task")
    if len(dict(jobs).get("chief", ())) > 1:
        raise _bad("names several chiefs: a cluster has one, the other machines are 'worker's")
    return tuple(jobs)


def _checked_task(task, jobs: dict) -> tuple[str, int]:
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise _bad("has no 'task' (this machine's place: {\"type\": \"worker\", \"index\": N})")
    task_type, index = task["type"], task["index"]
    if task_type == "evaluator":
        raise _bad("makes this machine an evaluator, which cmc_kit does not run: leave the "
                   "evaluator pool empty and run `cmc-kit evaluate` after training")
    if task_type not in jobs:
        raise _bad(f"gives the task type {task_type!r}, which is not a job of its cluster "
                   f"({', '.join(jobs)})")
    if isinstance(index, bool) or not isinstance(index, int):
        raise _bad(f"gives the task index {index!r}, not an integer")
    count = len(jobs[task_type])
    if not 0 <= index < count:
        raise _bad(f"gives the task index {index}, out of range: job {task_type!r} has {count} "
                   f"task(s), indices 0-{count - 1}")
    return task_type, index


# -- the workers of a strategy --------------------------------------------------------------------

class Workers:
    """This process's place among a strategy's workers, and what they must agree on.

    One worker (every strategy but a multi-worker one of several machines): index 0 of 1,
    the chief, and every agreement holds at once. Several: each method below is a small
    collective that every worker calls at the same point of the program.
    """

    def __init__(self, strategy):
        self.strategy = strategy
        self.index, self.count = 0, 1
        resolver = getattr(strategy, "cluster_resolver", None)
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and resolver:
            jobs = resolver.cluster_spec().as_dict()
            chiefs, workers = len(jobs.get("chief", [])), len(jobs.get("worker", []))
            if chiefs + workers > 1:
                self.count = chiefs + workers
                self.index = resolver.task_id + (chiefs if resolver.task_type == "worker" else 0)
        self.local_replicas = strategy.num_replicas_in_sync // self.count
        self._gather = tf.function(self._gather_on_replicas) if self.count > 1 else None

    @property
    def is_chief(self) -> bool:
        return self.index == 0

    def describe(self) -> str:
        """"worker 1 of 2" (and what it writes), or "" on one machine."""
        if self.count == 1:
            return ""
        role = "the chief, writes RUN" if self.is_chief else "writes nothing to RUN"
        return f"worker {self.index} of {self.count} ({role})"

    def _gather_on_replicas(self, values):
        def replica(v):
            # identity: a tensor of this replica's device for the collective
            return tf.distribute.get_replica_context().all_gather(tf.identity(v)[None], axis=0)
        gathered = self.strategy.run(replica, args=(values,))             # [replicas, n]
        return self.strategy.experimental_local_results(gathered)[0]

    def gather(self, values: list[int]) -> np.ndarray:
        """Every worker's `values`: int64 [workers, len(values)], by worker index."""
        mine = np.asarray(values, np.int64)[None]
        if self.count == 1:
            return mine
        rows = self._gather(tf.constant(mine[0])).numpy()        # [replicas, n]
        return rows[::self.local_replicas]                        # one row per worker

    def barrier(self) -> None:
        """Returns when every worker got here."""
        self.gather([0])

    def any(self, flag: bool) -> bool:
        """True on every worker when `flag` is True on one of them (a decision all take)."""
        return bool(self.gather([int(flag)]).any())

    def agree(self, values: dict, fix: str) -> None:
        """Raises TrainingError on every worker when the workers' `values` ({name: int}) differ;
        `fix` says what to do."""
        if self.count == 1:
            return
        names = list(values)
        rows = self.gather([values[name] for name in names])      # [workers, n]
        differ = [name for i, name in enumerate(names) if len(set(rows[:, i])) > 1]
        if differ:
            odd = sorted({w for i, name in enumerate(names) if name in differ
                          for w in range(self.count) if rows[w, i] != rows[0, i]})
            raise TrainingError(
                f"The {self.count} workers do not agree on {' and '.join(differ)}: worker(s) "
                f"{', '.join(map(str, odd))} differ from the chief (this is worker "
                f"{self.index}). {fix}")


def fingerprint(*parts) -> int:
    """A 62-bit number for comparing values across workers (JSON of `parts`)."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2


# -- each worker's share of a global batch --------------------------------------------------------

def _with_resume_position(batch: dict) -> dict:
    """"position" [B] -> "resume_position" [B]: every entry 1 + the batch's last plan place,
    where the epoch continues after this batch, the same on every replica and worker."""
    if "position" not in batch:
        return batch
    batch = dict(batch)
    position = batch.pop("position")                                      # [B]
    batch["resume_position"] = tf.fill(tf.shape(position), tf.reduce_max(position) + 1)
    return batch


def distribute_batches(strategy, dataset: tf.data.Dataset, global_batch: int, workers: Workers):
    """Per-replica batches of a dataset of global batches ({view: [B, ...]}, maybe "position").

    One worker: `experimental_distribute_dataset` splits each global batch between the local
    replicas. Several: every worker builds the same global batches (the same epoch plan and
    the same unreadable files skipped: each decodes the whole batch, as AutoShardPolicy.DATA
    would) and keeps its replicas' slices, so every worker runs the same steps, and replica r
    of the cluster gets rows [r*b, (r+1)*b), the order in which the keys are all-gathered.
    """
    dataset = dataset.map(_with_resume_position)
    if workers.count == 1:
        return strategy.experimental_distribute_dataset(dataset)
    per_replica = global_batch // strategy.num_replicas_in_sync
    first = workers.index * workers.local_replicas   # this worker's first replica in the cluster

    def own_slices(batch):                           # {k: [B, ...]} -> {k: [local, b, ...]}
        return {key: tf.stack([value[(first + j) * per_replica:(first + j + 1) * per_replica]
                               for j in range(workers.local_replicas)])
                for key, value in batch.items()}

    # Local replicas take consecutive elements: [b, ...] slices in replica order.
    return _let_go_in_background(strategy.distribute_datasets_from_function(
        lambda input_context: dataset.map(own_slices).unbatch()))


def _let_go_in_background(distributed):
    """The batches of `distributed`, whose spent iterator is destroyed in a thread of its own.

    On a worker of several, destroying a tf.data iterator waits for its autotuning thread's
    next wake-up, up to a minute after a long epoch (TensorFlow 2.21, also with autotuning
    off): the other workers would wait as long at every epoch end. The wait releases the GIL.
    Not a daemon thread: the interpreter waits for it at exit. A daemon thread still inside that
    destructor when the process ends is torn down mid-C++ ("terminate called after throwing an
    instance of ''", SIGABRT: seen once on a worker that had finished its last epoch).
    """
    iterator = iter(distributed)
    try:
        yield from iterator
    finally:
        spent = [iterator]
        del iterator
        threading.Thread(target=spent.clear, name="cmc-kit-spent-iterator", daemon=False).start()


# -- a worker lost --------------------------------------------------------------------------------

@contextlib.contextmanager
def lost_workers_explained(workers: Workers, where: Callable[[], str], timeout: float):
    """Turns the error a collective raises when another worker died or went silent into one
    TrainingError saying so, where training stood (`where()`) and how to resume."""
    if workers.count == 1:
        yield
        return
    try:
        yield
    except PEER_ERRORS as err:
        raise TrainingError(f"Worker {workers.index} of {workers.count} lost contact with the "
                            f"cluster ({_peer_failure(err, timeout)}) {where()}. Restart every "
                            "worker with the same command to resume from the latest "
                            "checkpoint.") from err


def _peer_failure(err, timeout: float) -> str:
    """What TensorFlow says happened, in a few words."""
    text = str(getattr(err, "message", err))
    silent = re.search(r"stopped sending heartbeats\)?:(.*?)(?:The tasks|\Z)", text, re.S)
    tasks = re.findall(r"/job:(\w+)/replica:\d+/task:(\d+)", silent.group(1)) if silent else \
        re.findall(r"remote target /job:(\w+)/replica:\d+/task:(\d+)", text)
    if tasks:
        names = ", ".join(sorted({f"{job}:{task}" for job, task in tasks}))
        return f"{names} stopped: crashed, killed or preempted (see its log)"
    if isinstance(err, tf.errors.DeadlineExceededError):
        return (f"no answer from another worker within train.collective_timeout ({timeout:g} s): "
                "one is stuck or far slower")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"another worker stopped: {(lines[0] if lines else type(err).__name__)[:160]}"
