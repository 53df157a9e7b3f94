"""Device meshes, logical-axis sharding rules, and the shardings of params, masks, LoRA and batches.

A mesh has three named axes: `data` (batch only), `fsdp` (batch, and params split along their
`embed` dimension, or the input one of `o`/`down`, gathered by XLA where a layer needs them) and
`tensor` (params split along heads, MLP and vocabulary dimensions). Params carry logical axis names by path (`PARAM_AXES`, regexes over
`/`-joined paths, like the pruning rules and LoRA targets); `LOGICAL_RULES` maps each logical name to
mesh axes, MaxText-style: a name lists candidate mesh axes in order and takes the first one of size
> 1 that the leaf's other dimensions have not already taken. Change the sharding by editing the rules,
not the model. Masks are sharded like their kernels; LoRA A `[r, in]` along the kernel's input axis,
B `[out, r]` along its output axis. Everything here is checked before anything compiles.

Multi-process: call `initialize_distributed()` first in every process (see its docstring for the
environment variables); every process then draws the same global batch, loads only its own rows of
it (`host_rows`), and `global_batch` assembles the global array.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import json
import math
import os
import re
import shlex
import sys
import threading
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sparsevlm.tree import SEP, flatten, match_rules, unflatten

PyTree = Any
AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Path regex → one logical name per dimension (None: never sharded). Flax kernels are [in, out];
# vectors are named after the dimension they run along. First match wins; no match: replicated.
# The output (`embed_out`) of `o`/`down` falls back to `fsdp` only where `tensor` has not split
# their input: with `fsdp` alone they are split along the input, the major axis, so a gathered
# kernel is already row-major (split along the minor axis, XLA gathered it column-major and then
# copied it: two full copies of the kernel at once).
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r".*/(q|k|v)/kernel", ("embed", "heads")),
    (r".*/(q|k|v)/bias", ("heads",)),
    (r".*/o/kernel", ("heads", "embed_out")),
    (r".*/(up|gate)/kernel", ("embed", "mlp")),
    (r".*/(up|gate)/bias", ("mlp",)),
    (r".*/down/kernel", ("mlp", "embed_out")),
    (r"connector/projection/kernel", ("embed", "embed_out")),
    (r".*/(o|down|projection)/bias", ("embed",)),
    (r".*(norm\w*)/(scale|bias)", ("embed",)),
    (r"language/embed/embedding", ("vocab", "embed")),
    (r"language/lm_head/kernel", ("embed", "vocab")),
    (r".*/relative_bias/embedding", (None, None)),  # [buckets, heads]: a few KiB
    (r"connector/(word|pos)_embed/embedding", (None, "embed")),
    (r".*/patch_embed/kernel", (None, None, None, "embed")),
    (r".*/patch_embed/bias", ("embed",)),
    (r"vision/pos_embed", (None, "embed")),
    (r"vision/cls_token", ("embed",)),
    (r"connector/query_tokens", (None, "embed")),
)

# Logical name → candidate mesh axes, in order of preference.
LOGICAL_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", BATCH_AXES),
    ("embed", ("fsdp",)),
    ("embed_out", ("tensor", "fsdp")),
    ("heads", ("tensor", "fsdp")),
    ("mlp", ("tensor", "fsdp")),
    ("vocab", ("tensor", "fsdp")),
)


# The mesh a train step is being traced for (set by `train.make_train_step`), read by `constrain_batch`.
_ACTIVATION_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("activation_mesh", default=None)


@contextlib.contextmanager
def activation_mesh(mesh: Mesh | None) -> Iterator[None]:
    """While tracing inside this context, `constrain_batch` pins activations to `mesh`'s batch axes."""
    token = _ACTIVATION_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def _batch_mesh_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the batch (leading) dimension is split over, by the logical rules (size-1 axes left out)."""
    spec = logical_to_spec(("batch",), mesh)
    axes = spec[0] if spec else None
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def constrain_batch(x: Any) -> Any:
    """`x` with its leading (batch) axis split over `data`×`fsdp` while a step traces on a mesh (else unchanged).

    Without it XLA may keep activations whole and all-reduce partial matmuls over an `fsdp`-sharded
    contraction; pinned, it gathers each layer's weights instead (FSDP), so activations stay split.
    """
    mesh = _ACTIVATION_MESH.get()
    if mesh is None or np.ndim(x) == 0:
        return x
    names = _batch_mesh_axes(mesh)
    if not names or np.shape(x)[0] % math.prod(mesh.shape[a] for a in names):
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(names, *([None] * (np.ndim(x) - 1)))))


def gathers_weights() -> bool:
    """True while a step traces on a mesh with `fsdp` > 1, where XLA gathers each layer's weights to use them."""
    mesh = _ACTIVATION_MESH.get()
    return mesh is not None and mesh.shape.get("fsdp", 1) > 1


def gather_late(after: Any, kernel_path: str, kernel: Any) -> Any:
    """`kernel`, made to depend on the arrays `after` while a step traces on a mesh with `fsdp` > 1 (else unchanged).

    FSDP gathers a weight where a layer uses it, but XLA is free to schedule every gather of a block
    (or of a loop-invariant LM head) at its start and keep them all alive. A kernel that depends on
    its layer's input (and in the backward pass on the incoming gradient too) cannot be gathered
    before those exist: one layer's gathered weights at a time. The dependency is a multiply by
    `1 + 0·isfinite(a₀)·…`, exactly 1 (an optimisation barrier would say the same, but XLA's CPU
    compiler drops barriers before it schedules), done on the kernel's shard, in its param layout.
    """
    if not gathers_weights():
        return kernel
    mesh = _ACTIVATION_MESH.get()
    spec = logical_to_spec(logical_axes(kernel_path, np.ndim(kernel)), mesh)
    try:
        _check_divisible(kernel_path, np.shape(kernel), spec, mesh)
    except ShardingError:
        return kernel
    pin = lambda v: jax.lax.with_sharding_constraint(v, NamedSharding(mesh, spec))  # noqa: E731
    return pin(tie_to(after, pin(kernel)))


def tie_to(after: Any, tree: Any) -> Any:
    """`tree` (unchanged values), made to depend on the arrays `after` while a step traces on a mesh with `fsdp` > 1.

    XLA schedules a computation as soon as its inputs exist; one tied to a layer's input cannot run
    before that layer does (see `gather_late`). Float leaves are multiplied by `1 + 0·isfinite(a₀)·…`,
    integer ones OR'ed with its `- 1` (both exactly the identity).
    """
    anchors = [a for a in jax.tree.leaves(after) if np.ndim(a) > 0]
    if not gathers_weights() or not anchors:
        return tree
    finite = math.prod(jnp.isfinite(a.reshape(-1)[0]).astype(jnp.float32) for a in anchors)
    one = 1.0 + 0.0 * finite

    def tie(v: Any) -> Any:
        if jnp.issubdtype(v.dtype, jnp.floating):
            return v * one.astype(v.dtype)
        return v | (one - 1.0).astype(v.dtype)

    return jax.tree.map(tie, tree)


def sum_over_batch_shards(fn: Any, rows: tuple[Any, ...], whole: tuple[Any, ...]) -> Any:
    """`fn(*rows, *whole)` for an `fn` that sums over the leading (batch) axis of `rows`, computed per batch shard.

    While a step traces on a mesh that splits the batch (and not `tensor`), each device applies `fn`
    to its own rows and only `fn`'s outputs are summed across devices, so a reduction to something
    small (a LoRA factor's gradient) never all-reduces the large intermediate it passes through (the
    full `[in, out]` weight gradient). `whole` are passed whole to every device. Off such a mesh: `fn` itself.
    """
    mesh = _ACTIVATION_MESH.get()
    if mesh is None or mesh.shape.get("tensor", 1) > 1:
        return fn(*rows, *whole)
    axes = _batch_mesh_axes(mesh)
    ways = math.prod(mesh.shape[a] for a in axes)
    if not axes or any(np.shape(r)[0] % ways for r in rows):
        return fn(*rows, *whole)

    def local(*args: Any) -> Any:
        return jax.tree.map(lambda y: jax.lax.psum(y, axes), fn(*args))

    in_specs = (PartitionSpec(axes),) * len(rows) + jax.tree.map(lambda _: PartitionSpec(), whole)
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=PartitionSpec(), check_vma=False)(
        *rows, *whole)


class ShardingError(ValueError):
    """A mesh or a sharding that cannot work for these devices or these shapes."""


class StepShardings(NamedTuple):
    """Shardings of a train step's arguments: the train state, then the batch and the other inputs in order."""

    state: PyTree
    inputs: tuple[PyTree, ...]


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the `data`, `fsdp` and `tensor` mesh axes; one size may be -1 (all remaining devices)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self) -> None:
        sizes = dataclasses.asdict(self)
        for name, size in sizes.items():
            if not isinstance(size, int) or (size < 1 and size != -1):
                raise ShardingError(f"mesh axis {name}={size!r} must be a positive integer or -1 (the rest)")
        if list(sizes.values()).count(-1) > 1:
            raise ShardingError(f"mesh {self.spec()}: at most one axis may be -1")

    @classmethod
    def parse(cls, text: str) -> "MeshConfig":
        """`"data=2,fsdp=4"` (unnamed axes default to data=-1, fsdp=1, tensor=1)."""
        sizes: dict[str, int] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, sep, value = item.partition("=")
            if not sep or name.strip() not in AXES:
                raise ShardingError(f"--mesh item {item!r} is not AXIS=SIZE with AXIS one of {', '.join(AXES)}")
            try:
                sizes[name.strip()] = int(value)
            except ValueError:
                raise ShardingError(f"--mesh {name.strip()}={value!r}: the size must be an integer") from None
        if "data" not in sizes:  # data takes the rest unless another axis does
            sizes["data"] = 1 if -1 in sizes.values() else -1
        return cls(**sizes)

    def spec(self) -> str:
        """The `data=..,fsdp=..,tensor=..` string."""
        return ",".join(f"{name}={getattr(self, name)}" for name in AXES)

    def shape(self, device_count: int) -> tuple[int, int, int]:
        """Axis sizes for `device_count` devices (resolving -1); their product must be the device count."""
        sizes = [getattr(self, name) for name in AXES]
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if device_count % known:
                raise ShardingError(
                    f"mesh {self.spec()}: the fixed axes ({known} devices) do not divide the {device_count} "
                    f"devices{_across_processes()}"
                )
            sizes = [device_count // known if s == -1 else s for s in sizes]
        elif known != device_count:
            raise ShardingError(
                f"mesh {self.spec()} needs {known} devices, but there are {device_count}{_across_processes()}; "
                f"the axis sizes must multiply to the device count (use -1 for one axis to take the rest)"
            )
        return tuple(sizes)  # type: ignore[return-value]


def _across_processes() -> str:
    """" (across N processes of M devices each)" in a multi-process run, for messages about the device count."""
    if not jax.distributed.is_initialized() or jax.process_count() == 1:
        return ""
    return f" across {jax.process_count()} processes of {jax.local_device_count()} devices each"


def make_mesh(config: MeshConfig | str = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `(data, fsdp, tensor)` mesh over `devices` (default: all of them, across hosts)."""
    if isinstance(config, str):
        config = MeshConfig.parse(config)
    devices = list(jax.devices() if devices is None else devices)
    shape = config.shape(len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES), devices=devices)


def _environment_int(name: str, default: int, lowest: int = 1) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ShardingError(f"{name}={text!r} must be an integer") from None
    if value < lowest:
        raise ShardingError(f"{name}={value} must be >= {lowest}")
    return value


def _cluster_detected() -> bool:
    """True inside a multi-task SLURM step or on a multi-host Cloud TPU slice (JAX's own detectors, by environment)."""
    slurm = int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_STEP_ID" in os.environ
    tpu_hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES") or ""
    return slurm or "," in tpu_hosts


def initialize_distributed() -> bool:
    """Join a multi-process run (`jax.distributed.initialize`) when the environment describes one.

    Explicit: `JAX_COORDINATOR_ADDRESS` (host:port of process 0), `JAX_NUM_PROCESSES` and
    `JAX_PROCESS_ID`. Detected by JAX itself: a SLURM step of several tasks (`srun`) and a multi-host
    Cloud TPU slice; `SPARSEVLM_DISTRIBUTED=1` forces detection, `=0` turns it off. CPU collectives
    use gloo. A process that waits longer than `SPARSEVLM_DISTRIBUTED_TIMEOUT` seconds (300) for the
    others prints one error line and exits 2; a process that dies later takes the others down within
    `SPARSEVLM_HEARTBEAT_TIMEOUT` seconds (100). Returns whether it joined. Call before any other JAX call.
    """
    explicit = os.environ.get("JAX_COORDINATOR_ADDRESS")
    switch = os.environ.get("SPARSEVLM_DISTRIBUTED")
    if switch not in (None, "", "0", "1"):
        raise ShardingError(f"SPARSEVLM_DISTRIBUTED={switch!r} must be 1 (join a multi-process run) or 0 (do not)")
    if jax.distributed.is_initialized():
        return True
    if not explicit and (switch == "0" or (switch != "1" and not _cluster_detected())):
        return False
    timeout = _environment_int("SPARSEVLM_DISTRIBUTED_TIMEOUT", 300)
    heartbeat = _environment_int("SPARSEVLM_HEARTBEAT_TIMEOUT", 100)
    arguments: dict[str, Any] = {}
    where = "the coordinator JAX detected"
    if explicit:
        missing = [v for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if v not in os.environ]
        if missing:
            raise ShardingError(f"JAX_COORDINATOR_ADDRESS={explicit!r} is set but {', '.join(missing)} is not")
        count, index = _environment_int("JAX_NUM_PROCESSES", 1), _environment_int("JAX_PROCESS_ID", 0, lowest=0)
        if index >= count:
            raise ShardingError(f"JAX_PROCESS_ID={index} must be in [0, JAX_NUM_PROCESSES={count})")
        arguments = dict(coordinator_address=explicit, num_processes=count, process_id=index)
        where = f"process {index} of {count}, coordinator {explicit}"
    # Gloo is JAX's CPU collectives here; set, not assumed, so a CPU run never falls back to none.
    # (It configures the CPU client only: a GPU or TPU run is unaffected.)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")

    def give_up() -> None:
        # XLA aborts with a stack trace when its own (later) deadline passes; say what to do instead.
        print(f"sparsevlm: error: {where}: the other processes did not all join within {timeout} s; start the "
              "same command on every process (or raise SPARSEVLM_DISTRIBUTED_TIMEOUT)", file=sys.stderr, flush=True)
        os._exit(2)

    watchdog = threading.Timer(timeout, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(**arguments, initialization_timeout=timeout + 60,
                                   heartbeat_timeout_seconds=heartbeat, shutdown_timeout_seconds=timeout)
    finally:
        watchdog.cancel()
    return True


def is_primary() -> bool:
    """True on the one process that writes shared files (model directories, reports, exports): process 0."""
    return jax.process_index() == 0


def check_same_command(argv: Sequence[str]) -> None:
    """Every process of a multi-process run must run the same command: a one-line error on each if not."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils  # collectives over every process

    digest = np.frombuffer(hashlib.sha256(json.dumps(list(argv)).encode()).digest(), np.uint8)
    digests = np.asarray(multihost_utils.process_allgather(digest)).reshape(jax.process_count(), -1)
    differ = [i for i in range(len(digests)) if not np.array_equal(digests[i], digests[0])]
    if differ:
        raise ShardingError(
            f"the {jax.process_count()} processes were not started with the same command (process "
            f"{differ[0]} differs from process 0); every process must run the same one, this one (process "
            f"{jax.process_index()}) ran: {shlex.join(argv)}"
        )


def barrier(name: str) -> None:
    """Wait until every process gets here (nothing on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    """The logical axis names of the param at `path` (all None where no rule matches)."""
    axes = match_rules(path, PARAM_AXES)
    if axes is None:
        return (None,) * ndim
    if len(axes) + 1 == ndim and re.search(r"(^|/)blocks/", path):
        axes = (None, *axes)  # a scanned block stack's leading layer axis (`stack_layers`): never sharded
    if len(axes) != ndim:
        raise ShardingError(f"param {path}: {ndim} dimensions, but its axis rule names {len(axes)}: {axes}")
    return axes


def logical_to_spec(
    axes: Sequence[str | None], mesh: Mesh, rules: Sequence[tuple[str, tuple[str, ...]]] = LOGICAL_RULES
) -> PartitionSpec:
    """Mesh axes for logical `axes`: per dimension, the first candidate of size > 1 not yet taken.

    Every dimension's first choice is honoured before any dimension falls back to a later one, so
    an `[vocab, embed]` table puts `embed` on `fsdp` even when `vocab` could fall back to it.
    """
    table = dict(rules)
    candidates = [list(table.get(name, ())) if name is not None else [] for name in axes]
    chosen: list[list[str]] = [[] for _ in axes]
    taken: set[str] = set()
    for dim, options in enumerate(candidates):  # first choices (a size-1 axis shards nothing: skipped)
        if options and mesh.shape[options[0]] > 1 and options[0] not in taken:
            chosen[dim].append(options[0])
            taken.add(options[0])
    for dim, (name, options) in enumerate(zip(axes, candidates)):  # fallbacks; `batch` spans all it can
        for axis in options[1:]:
            if mesh.shape[axis] == 1 or axis in taken or (chosen[dim] and name != "batch"):
                continue
            chosen[dim].append(axis)
            taken.add(axis)
    return PartitionSpec(*(None if not c else c[0] if len(c) == 1 else tuple(c) for c in chosen))


def _check_divisible(path: str, shape: Sequence[int], spec: PartitionSpec, mesh: Mesh) -> None:
    for dim, (size, axes) in enumerate(zip(shape, spec)):
        if axes is None:
            continue
        names = (axes,) if isinstance(axes, str) else axes
        ways = math.prod(mesh.shape[a] for a in names)
        if size % ways:
            raise ShardingError(
                f"{path}: dimension {dim} of shape {tuple(shape)} has size {size}, not divisible by mesh axis "
                f"{'×'.join(names)} of size {ways}; change the mesh or the rule for this param in "
                f"sparsevlm.sharding.PARAM_AXES / LOGICAL_RULES"
            )


def param_specs(params: PyTree, mesh: Mesh, rules: Sequence[tuple[str, tuple[str, ...]]] = LOGICAL_RULES) -> PyTree:
    """A `PartitionSpec` per param leaf (checked: every sharded dimension divides its mesh axes)."""
    specs = {}
    for path, leaf in flatten(params).items():
        spec = logical_to_spec(logical_axes(path, np.ndim(leaf)), mesh, rules)
        _check_divisible(path, np.shape(leaf), spec, mesh)
        specs[path] = spec
    return unflatten(specs)


def param_shardings(params: PyTree, mesh: Mesh, rules: Sequence[tuple[str, tuple[str, ...]]] = LOGICAL_RULES) -> PyTree:
    """A `NamedSharding` per param leaf, from the logical-axis rules."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(params, mesh, rules),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def mask_shardings(masks: PyTree, shardings: PyTree) -> PyTree:
    """Each mask sharded like its kernel (None where a param has no mask); a packed mask's last axis, 8×
    shorter than the kernel's, stays whole where the kernel's mesh axes do not divide it."""
    kernels = flatten(shardings)
    out = {}
    for path, mask in flatten(masks).items():
        if mask is None:
            out[path] = None
            continue
        kernel = kernels[path]
        spec = list(kernel.spec) + [None] * (np.ndim(mask) - len(kernel.spec))
        def ways(axes: Any) -> int:
            return math.prod(kernel.mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))

        for dim, axes in enumerate(spec):
            if np.shape(mask)[dim] % ways(axes):
                spec[dim] = None  # a mask's layout is its own: move the axes to a dimension they divide
                free = [d for d in range(len(spec)) if spec[d] is None and d != dim and np.shape(mask)[d] % ways(axes) == 0]
                if free:
                    spec[free[0]] = axes
        out[path] = NamedSharding(kernel.mesh, PartitionSpec(*spec))
    return unflatten(out)


def lora_shardings(lora: PyTree, shardings: PyTree) -> PyTree:
    """LoRA A `[r, in]` along its kernel's input axis, B `[out, r]` along its output axis; a factor whose own
    axis the kernel leaves whole takes the kernel's other mesh axes (where they divide it), so no factor is
    replicated on a mesh that splits its kernel."""
    kernels = flatten(shardings)
    out = {}
    for path, factor_value in flatten(lora).items():
        kernel_path, factor = path.rsplit(SEP, 1)
        kernel = kernels[kernel_path]
        lead = np.ndim(factor_value) - 2  # 1 for a scanned stack's layer axis (never sharded)
        spec = tuple(kernel.spec) + (None,) * 3  # [(layers,) in, out], padded for unsharded kernels
        own, other = (spec[lead], spec[lead + 1]) if factor == "a" else (spec[lead + 1], spec[lead])
        size = np.shape(factor_value)[lead + 1 if factor == "a" else lead]
        if own is None and other is not None:
            names = (other,) if isinstance(other, str) else other
            own = other if size % math.prod(kernel.mesh.shape[a] for a in names) == 0 else None
        inner = (None, own) if factor == "a" else (own, None)
        out[path] = NamedSharding(kernel.mesh, PartitionSpec(*(None,) * lead, *inner))
    return unflatten(out)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def _batch_sharding(name: str, shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    spec = logical_to_spec(("batch",), mesh)
    _check_divisible(f"batch {name!r} (batch size)", tuple(shape)[:1], spec, mesh)
    return NamedSharding(mesh, PartitionSpec(*spec, *([None] * (len(shape) - 1))))


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, Any]:
    """Every batch array split along its leading (example) dimension over `data`×`fsdp`."""
    return {name: None if value is None else _batch_sharding(name, np.shape(value), mesh)
            for name, value in batch.items()}


def opt_state_shardings(optimizer: optax.GradientTransformation, state: PyTree, shardings: PyTree, mesh: Mesh) -> PyTree:
    """Optimizer state sharded like the params it mirrors (Adam moments); counters replicated."""
    return optax.tree_map_params(
        optimizer, lambda _, sharding: sharding, state, shardings,
        transform_non_params=lambda _: replicated(mesh), is_leaf=lambda x: isinstance(x, NamedSharding),
    )


def shard(tree: PyTree, shardings: PyTree) -> PyTree:
    """`tree` placed on the mesh with `shardings` (None leaves stay None).

    Over several processes every process holds the same whole values and places only its own
    shards of them (`device_put` would compare every leaf across the processes first: one collective each).
    """
    def place(x: Any, sharding: Any) -> Any:
        if sharding is None:
            return x
        if sharding.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
            return jax.device_put(x, sharding)
        value = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(place, tree, shardings, is_leaf=lambda x: x is None)


def host_rows(mesh: Mesh, batch_size: int) -> slice:
    """The rows of a global batch of `batch_size` that this process's devices hold (all of them on one process).

    Every process draws the same global batch of example indices and loads only these rows, so a run
    of several processes sees the same batches as one process on the same mesh.
    """
    sharding = _batch_sharding("rows", (batch_size,), mesh)
    starts, stops = zip(*((index[0].start or 0, batch_size if index[0].stop is None else index[0].stop)
                          for index in sharding.addressable_devices_indices_map((batch_size,)).values()))
    rows = slice(min(starts), max(stops))
    held = {row for start, stop in zip(starts, stops) for row in range(start, stop)}
    if len(held) != rows.stop - rows.start:  # the mesh puts this process's devices on rows that are not contiguous
        raise ShardingError(f"mesh {dict(mesh.shape)}: process {jax.process_index()} holds rows {sorted(held)} of the "
                            f"batch of {batch_size}, not one contiguous range; put data and fsdp across processes")
    return rows


def global_batch(local: Mapping[str, Any], mesh: Mesh, batch_size: int | None = None) -> dict[str, Any]:
    """One global batch of `batch_size` rows from this process's rows of it (`host_rows`).

    Default `batch_size`: this process's rows times the process count (no rows on two processes).
    """
    out = {}
    for name, value in local.items():
        if value is None:
            out[name] = None
            continue
        shape = np.shape(value)
        global_shape = (batch_size or shape[0] * jax.process_count(), *shape[1:])
        out[name] = jax.make_array_from_process_local_data(
            _batch_sharding(name, global_shape, mesh), np.asarray(value), global_shape)
    return out


def to_host(tree: PyTree) -> PyTree:
    """`tree` as host (NumPy) arrays; arrays spread over several processes are gathered from all of them
    (a collective: every process calls this with the same tree)."""
    leaves, structure = jax.tree.flatten(tree)
    spread = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array) and not x.is_fully_addressable]
    if spread:
        # One program replicates them all (not one collective per leaf); each process reads its own copy.
        whole = [NamedSharding(leaves[i].sharding.mesh, PartitionSpec()) for i in spread]
        gathered = jax.jit(lambda xs: xs, out_shardings=whole)([leaves[i] for i in spread])
        for i, x in zip(spread, gathered):
            leaves[i] = np.asarray(x.addressable_data(0))
    return jax.tree.unflatten(structure, [x if isinstance(x, np.ndarray) else jax.device_get(x) for x in leaves])


def bytes_per_device(tree: PyTree, shardings: PyTree) -> int:
    """Bytes one device holds of `tree` laid out by `shardings` (its shard of every leaf)."""
    leaves = jax.tree.leaves(tree)
    shards = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    return sum(math.prod(sharding.shard_shape(np.shape(leaf))) * np.dtype(leaf.dtype).itemsize
               for leaf, sharding in zip(leaves, shards, strict=True))


def tree_bytes(tree: PyTree) -> int:
    """Bytes of every leaf of `tree`, unsharded."""
    return sum(math.prod(np.shape(x)) * np.dtype(getattr(x, "dtype", np.float32)).itemsize for x in jax.tree.leaves(tree))


def with_sharding(tree: PyTree, shardings: PyTree) -> PyTree:
    """Abstract `ShapeDtypeStruct`s of `tree` carrying `shardings` (to compile without allocating)."""
    return jax.tree.map(
        lambda x, s: None if x is None else jax.ShapeDtypeStruct(np.shape(x), np.dtype(x.dtype), sharding=s),
        tree, shardings, is_leaf=lambda x: x is None,
    )

def _state_shardings(optimizer: optax.GradientTransformation, state: PyTree, trained: PyTree, mesh: Mesh) -> PyTree:
    """A train state's shardings: the trained tree as given, optimizer state like it, the step counter replicated."""
    return state._replace(params=trained, opt_state=opt_state_shardings(optimizer, state.opt_state, trained, mesh),
                          step=replicated(mesh))


def restore_shardings(
    mesh: Mesh, optimizer: optax.GradientTransformation, state: PyTree, params: PyTree, masks: PyTree,
    batch: Mapping[str, Any], rules: Sequence[tuple[str, tuple[str, ...]]] = LOGICAL_RULES,
) -> StepShardings:
    """Shardings of a restoration step's `(TrainState of LoRA factors, batch, params, masks)` on `mesh`."""
    params_sh = param_shardings(params, mesh, rules)
    state_sh = _state_shardings(optimizer, state, lora_shardings(state.params, params_sh), mesh)
    return StepShardings(state_sh, (batch_shardings(batch, mesh), params_sh, mask_shardings(masks, params_sh)))


def train_shardings(
    mesh: Mesh, optimizer: optax.GradientTransformation, state: PyTree, batch: Mapping[str, Any],
    rules: Sequence[tuple[str, tuple[str, ...]]] = LOGICAL_RULES,
) -> StepShardings:
    """Shardings of a full-parameter step's `(TrainState, batch)` on `mesh`."""
    state_sh = _state_shardings(optimizer, state, param_shardings(state.params, mesh, rules), mesh)
    return StepShardings(state_sh, (batch_shardings(batch, mesh),))


def compile_step(step: Any, args: Sequence[PyTree], shardings: Sequence[PyTree]) -> jax.stages.Compiled:
    """Jitted `step` compiled ahead of time for `args` laid out by `shardings` (allocates nothing)."""
    return step.lower(*(with_sharding(arg, sharding) for arg, sharding in zip(args, shardings))).compile()


def compiled_memory(compiled: jax.stages.Compiled) -> dict[str, int]:
    """XLA's per-device buffer bytes of a compiled step: arguments, outputs, aliased, temporaries, code, total."""
    analysis = compiled.memory_analysis()
    out = {
        "arguments": int(analysis.argument_size_in_bytes),
        "outputs": int(analysis.output_size_in_bytes),
        "aliased": int(analysis.alias_size_in_bytes),
        "temporaries": int(analysis.temp_size_in_bytes),
        "code": int(analysis.generated_code_size_in_bytes),
    }
    out["step_total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    return out


def restore_memory(compiled: jax.stages.Compiled, shardings: StepShardings, state: PyTree, params: PyTree,
                   masks: PyTree, batch: Mapping[str, Any]) -> dict[str, int]:
    """Per-device bytes of a restoration step on its mesh: each input tree, and XLA's compiled-step figures."""
    batch_sh, params_sh, masks_sh = shardings.inputs
    parts = {
        "params": bytes_per_device(params, params_sh),
        "masks": bytes_per_device(masks, masks_sh),
        "lora": bytes_per_device(state.params, shardings.state.params),
        "optimizer": bytes_per_device(state.opt_state, shardings.state.opt_state),
        "batch": bytes_per_device(batch, batch_sh),
    }
    return parts | compiled_memory(compiled)


def format_memory(report: Mapping[str, int], mesh: Mesh | None = None) -> str:
    """A two-column table of a memory report, in MiB per device."""
    title = f"per-device memory on mesh {dict(mesh.shape)}" if mesh is not None else "per-device memory"
    lines = [title]
    for name, value in report.items():
        lines.append(f"  {name:<12}{value / 2**20:>12.2f} MiB")
    return "\n".join(lines)
