"""Where training runs: the tf.distribute strategy (one device, Mirrored, MultiWorker, TPU)
and the mixed-precision policy for the devices found."""

from __future__ import annotations

import contextlib
import glob
import socket

import keras
import tensorflow as tf

from cmc_kit.config import tpu_environment
from cmc_kit.errors import ConfigError, TrainingError
from cmc_kit.training.cluster import WorkerCluster, cluster_from_environment

# Device files of TPU chips attached to the VM itself: /dev/accel* (TPU v2-v4 VMs, e.g. Kaggle's
# v3-8), /dev/vfio/N (v5e and later, e.g. Kaggle's v5e-8).
LOCAL_TPU_DEVICE_GLOBS = ("/dev/accel*", "/dev/vfio/[0-9]*")


def tpu_addresses_to_try(environ=None, device_globs=None) -> list:
    """`TPUClusterResolver(tpu=...)` arguments to try, most likely first.

    TPU_NAME in the environment: that TPU only. TPU chips attached to this VM (Kaggle's and
    Colab's TPU VMs): "local" first, as TensorFlow's TPU guide recommends there (the default
    resolver goes through the Cloud TPU API, which such VMs may not answer), then the default.
    Otherwise the default resolver (a Cloud TPU node found through the GCE metadata server).
    """
    environ = tpu_environment() if environ is None else environ
    device_globs = LOCAL_TPU_DEVICE_GLOBS if device_globs is None else device_globs
    if environ.get("TPU_NAME"):
        return [environ["TPU_NAME"]]
    attached = any(glob.glob(pattern) for pattern in device_globs)
    return ["local", None] if attached or environ.get("TPU_ACCELERATOR_TYPE") else [None]


def connect_tpu(addresses=None):
    """A TPUStrategy for the first TPU in `addresses` that initialises, or None.

    Also returns the errors met on the way, for the message when a TPU was insisted on.
    """
    errors = []
    for address in tpu_addresses_to_try() if addresses is None else addresses:
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=address)
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
            return tf.distribute.TPUStrategy(resolver), errors
        except (ValueError, RuntimeError, tf.errors.OpError) as err:
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
            errors.append(f"tpu={address!r}: {first_line[:200]}")
    return None, errors


def select_strategy(name: str = "auto", cluster: WorkerCluster | None = None, *,
                    collective_timeout: float = 1800.0):
    """The tf.distribute strategy for `train.strategy`.

    "auto": MultiWorkerMirroredStrategy if TF_CONFIG names several training tasks, else
    TPUStrategy if a TPU is attached, MirroredStrategy over all GPUs if there are two or more
    (Kaggle's 2x T4), else the default strategy. "multi-worker" insists on
    MultiWorkerMirroredStrategy (over this machine's devices alone without TF_CONFIG);
    "mirrored" mirrors over all GPUs, or over all logical CPU devices when there is no GPU
    (CPU tests split the CPU in two); "default" is the default strategy; "tpu" insists on a
    TPU (see `tpu_addresses_to_try` for where it looks; set TPU_NAME to name one).

    cluster: the checked TF_CONFIG; None reads it (`cluster.cluster_from_environment`).
    Multi-worker: call this before anything else runs in TensorFlow (TensorFlow configures
    its collectives once, at program start); collective_timeout: seconds a collective waits
    for the other workers (0: for ever).
    """
    cluster = cluster or cluster_from_environment()
    several = cluster is not None and cluster.num_workers > 1
    if name == "multi-worker" or (name == "auto" and several):
        return multi_worker_strategy(cluster, collective_timeout)
    if several:
        raise ConfigError(
            f"TF_CONFIG names {cluster.num_workers} training tasks but train.strategy={name} "
            "trains on one machine, so every task would train alone and write the same run "
            "directory. Use --set train.strategy=multi-worker (or auto), or unset TF_CONFIG.")
    if name in ("auto", "tpu"):
        strategy, errors = connect_tpu()
        if strategy is not None:
            return strategy
        if name == "tpu":
            raise TrainingError(
                "train.strategy=tpu but no TPU could be initialised ("
                + "; ".join(errors) + "). On Kaggle pick a TPU accelerator in the notebook "
                "settings; elsewhere set TPU_NAME to the TPU's name or address, or use "
                "--set train.strategy=auto.")
    gpus = tf.config.list_logical_devices("GPU")
    if name == "mirrored" or (name == "auto" and len(gpus) > 1):
        devices = gpus or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([device.name for device in devices])
    return tf.distribute.get_strategy()


# TensorFlow configures collectives and starts this task's server once per process, so a
# process joins one cluster: the strategy is kept and handed out again (train() called twice).
_JOINED_CLUSTER: dict = {}


def multi_worker_strategy(cluster: WorkerCluster | None, collective_timeout: float):
    """MultiWorkerMirroredStrategy over `cluster` (None: this machine's devices alone)."""
    key = (cluster, float(collective_timeout))
    if key in _JOINED_CLUSTER:
        return _JOINED_CLUSTER[key]
    if _JOINED_CLUSTER:
        raise TrainingError(
            "This process already joined a multi-worker cluster with other settings (TF_CONFIG "
            "or train.collective_timeout); TensorFlow sets that up once per process. Start a "
            "new process for the other cluster.")
    resolver = None
    if cluster is not None:
        check_port_free(cluster)
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec({job: list(addresses) for job, addresses in cluster.jobs}),
            task_type=cluster.task_type, task_id=cluster.task_index, rpc_layer="grpc",
            # the local replicas: every GPU of this machine (else its CPU)
            num_accelerators={"GPU": len(tf.config.list_physical_devices("GPU"))})
    options = tf.distribute.experimental.CommunicationOptions(
        timeout_seconds=collective_timeout or None)
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver,
                                                              communication_options=options)
    except RuntimeError as err:  # "Collective ops must be configured at program startup"
        raise TrainingError(
            f"train.strategy=multi-worker must be set up before TensorFlow runs anything in "
            f"this process ({err}). Use `cmc-kit train` or `training.train`, or call "
            "training.select_strategy('multi-worker') first thing and pass it to "
            "Trainer(strategy=...).") from err
    _JOINED_CLUSTER[key] = strategy
    return strategy


def check_port_free(cluster: WorkerCluster) -> None:
    """ConfigError when this task's port is taken on this machine (TensorFlow's own server
    would fail to start on it, with a less clear message)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # A port a killed worker used lingers in TIME_WAIT: that one is free to listen on.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", cluster.port))
        except OSError as err:
            raise ConfigError(
                f"TF_CONFIG gives this task ({cluster.task}) the address {cluster.address}, but "
                f"port {cluster.port} is already in use on this machine ({err.strerror}). Stop "
                "what holds it (an earlier worker still running?) or give this task another "
                "port, in the TF_CONFIG of every machine.") from None


def has_accelerator() -> bool:
    """A GPU or TPU is attached (XLA is used only then: on CPU it slows grouped convs ~9x)."""
    return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))


def precision_for_devices(*, tpu: bool, gpu_capabilities: list[tuple[int, int]]) -> str:
    """The mixed-precision policy for the attached accelerators.

    TPU, or GPUs that are all Hopper (compute capability >= 9.0): "mixed_bfloat16" (no loss
    scaling needed). GPUs that all have tensor cores (>= 7.0: V100, T4, A100...):
    "mixed_float16". Otherwise (CPU, older GPUs): "float32". Mirrored replicas run the same
    program, so the weakest GPU decides.
    """
    if tpu:
        return "mixed_bfloat16"
    if not gpu_capabilities:
        return "float32"
    weakest = min(gpu_capabilities)
    if weakest >= (9, 0):
        return "mixed_bfloat16"
    if weakest >= (7, 0):
        return "mixed_float16"
    return "float32"


def resolve_mixed_precision(setting: str) -> str:
    """`train.mixed_precision` -> a Keras dtype policy name; "auto" looks at the devices."""
    if setting != "auto":
        return "float32" if setting == "off" else setting
    capabilities = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        capabilities.append(tuple(details.get("compute_capability", (0, 0))))
    return precision_for_devices(tpu=bool(tf.config.list_logical_devices("TPU")),
                                 gpu_capabilities=capabilities)


@contextlib.contextmanager
def dtype_policy(name: str):
    """Layers built inside take the policy `name`; the global policy is restored afterwards, so
    models built later in the same process (embedding, probes, tests) stay float32."""
    before = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(before)
