"""Where the RL stage's actors run, and whether the learner fits the cluster declared for it.

`Placement` is the `placement:` section of the RL config: learner ranks and rollout workers with
the Ray resources each holds, and optionally the `cluster` they must fit. `plan` is what
`align run FILE --dry-run` prints for an RL stage: GPUs per node, learners, workers, and the
learner's memory per GPU computed from the policy's config.json (no weights are read). With a
declared cluster it refuses a placement that cannot fit.

The learner's memory per GPU, with FSDP2 over `learners` ranks (bf16 compute, fp32 master):
- sharded state: 16 bytes per parameter / learners (fp32 weights 4, fp32 gradients 4, AdamW's two
  moments 8); with `learner.lora` the policy is frozen, 4 bytes per parameter (the adapters'
  state is not counted); with `learner.offload` this lives in host memory instead;
- layers in flight: two decoder layers unsharded in bf16 with their bf16 gradients (the
  current one and the prefetched next), plus the root unit (embeddings, final norm, head);
- logits of a micro-batch: micro_batch_size x max_model_len x vocabulary x 10 bytes (bf16
  logits, their fp32 log-softmax and its gradient);
- activations: Korthikanti et al.'s 34 x hidden bytes per token and layer (bf16, no attention
  scores stored), for micro_batch_size x max_model_len tokens; with gradient checkpointing,
  2 x hidden bytes per token and layer plus one layer's full activations.
Allocator fragmentation and communication buffers are not counted: the check keeps 10% free.
A rollout worker's GPU holds weights / tensor_parallel_size in the engine dtype plus its
KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from align.config import check

if TYPE_CHECKING:
    from transformers import PretrainedConfig

GIB = 1 << 30
# Share of a GPU the estimate may fill; the rest is for what it does not count.
USABLE = 0.9


@dataclass
class Cluster:
    """The GPU cluster a placement must fit; `--dry-run` and `align rl` refuse one that does not."""

    # Machines, and GPUs in each.
    nodes: int = 1
    gpus_per_node: int = 8
    # Memory of one GPU in GiB.
    gpu_memory_gib: float = 80.0

    def validate(self) -> None:
        check(self.nodes >= 1, "nodes", f"must be >= 1 (got {self.nodes})")
        check(self.gpus_per_node >= 1, "gpus_per_node", f"must be >= 1 (got {self.gpus_per_node})")
        check(self.gpu_memory_gib > 0, "gpu_memory_gib", f"must be > 0 (got {self.gpu_memory_gib})")


@dataclass
class Placement:
    """Where the RL stage's actors run (Ray resources). Colocated: give workers and learners
    fractions of the same GPU (e.g. 0.5 each); separate: whole GPUs each."""

    # Rollout workers, each one vLLM engine.
    workers: int = 1
    # CPUs and GPUs reserved per rollout worker (GPUs = the engine's tensor_parallel_size).
    worker_cpus: float = 1.0
    worker_gpus: float = 0.0
    # Learner ranks: the policy, its gradients and optimiser state are sharded over them.
    learners: int = 1
    # CPUs and GPUs reserved per learner rank.
    learner_cpus: float = 1.0
    learner_gpus: float = 0.0
    # Compute threads (OMP_NUM_THREADS) of each learner rank; 0: floor(learner_cpus). More
    # threads than reserved CPUs share cores with the rollout workers: worth it only where the
    # workers idle while the learner trains (synchronous runs). On the embedded default, a
    # 64 x 8 learner step alone takes ~15 s on one thread and ~9 s on two, but in an async run,
    # where the worker generates most of the time, two threads made it slower (a mean forward
    # and backward of 13.8 s against 11.4 s): the threads fight over the cores.
    learner_threads: int = 0
    # Custom Ray resources each worker / learner rank also needs, e.g. {"rollout_node": 1} to
    # keep workers on the nodes started with `ray start --resources '{"rollout_node": 8}'`.
    worker_resources: dict[str, float] = field(default_factory=dict)
    learner_resources: dict[str, float] = field(default_factory=dict)
    # Address of a running Ray cluster to join (e.g. "auto" or "ray://head:10001"); null starts
    # a local Ray with the resources of this machine.
    ray_address: str | None = None
    # The cluster this placement must fit (GPU count per node, GPU memory); null: not checked.
    cluster: Cluster | None = None

    def validate(self) -> None:
        check(self.workers >= 1, "workers", f"must be >= 1 (got {self.workers})")
        check(self.learners >= 1, "learners", f"must be >= 1 (got {self.learners})")
        for key in ("worker_cpus", "worker_gpus", "learner_cpus", "learner_gpus"):
            check(getattr(self, key) >= 0, key, f"must be >= 0 (got {getattr(self, key)})")
        check(
            self.learner_threads >= 0, "learner_threads", f"must be >= 0 ({self.learner_threads})"
        )
        for key in ("worker_resources", "learner_resources"):
            for name, amount in getattr(self, key).items():
                check(amount > 0, f"{key}.{name}", f"must be > 0 (got {amount})")
        if self.cluster is not None:
            problem = gpu_packing_problem(self, self.cluster)
            check(problem is None, "cluster", problem or "")


def _bundles(placement: Placement) -> list[tuple[str, float]]:
    return [("learner", placement.learner_gpus)] * placement.learners + [
        ("worker", placement.worker_gpus)
    ] * placement.workers


def gpu_packing_problem(placement: Placement, cluster: Cluster) -> str | None:
    """Why the actors' GPUs cannot be placed on `cluster` (an actor's GPUs on one node), or None.

    Actors are packed largest first onto the node with the most free GPUs, as Ray would
    find room for them.
    """
    free = [float(cluster.gpus_per_node)] * cluster.nodes
    wanted = sum(g for _, g in _bundles(placement))
    for kind, gpus in sorted(_bundles(placement), key=lambda b: -b[1]):
        if gpus > cluster.gpus_per_node:
            return (
                f"a {kind} needs {gpus:g} GPUs but a node has {cluster.gpus_per_node}: one "
                "actor's GPUs must be on one node (lower tensor_parallel_size / worker_gpus)"
            )
        node = max(range(cluster.nodes), key=lambda n: free[n])
        if free[node] + 1e-9 < gpus:
            return (
                f"{placement.learners} learner(s) x {placement.learner_gpus:g} GPU + "
                f"{placement.workers} worker(s) x {placement.worker_gpus:g} GPU = {wanted:g} "
                f"GPUs do not fit {cluster.nodes} node(s) x {cluster.gpus_per_node} GPUs"
            )
        free[node] -= gpus
    return None


@dataclass
class ModelShape:
    """What the memory arithmetic needs from a policy's config.json."""

    parameters: int
    # Parameters of one decoder layer (the largest), and outside the layers (root unit).
    layer_parameters: int
    root_parameters: int
    layers: int
    hidden_size: int
    vocab_size: int

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> ModelShape:
        """Counts the parameters of a transformers config's architecture on the meta device."""
        from align.modeling import decoder_layers, empty_model

        model = empty_model(config)
        # A vision-language model's vision tower counts with the root (embeddings, head).
        layers = decoder_layers(model)
        per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
        total = sum(p.numel() for p in model.parameters())
        return cls(
            parameters=total,
            layer_parameters=max(per_layer),
            root_parameters=total - sum(per_layer),
            layers=len(layers),
            # A multimodal checkpoint (Llama 4's) nests the language model's settings.
            hidden_size=config.get_text_config().hidden_size,
            vocab_size=config.get_text_config().vocab_size,
        )


@dataclass
class LearnerMemory:
    """Bytes per learner GPU, by part (see the module docstring)."""

    sharded: float
    in_flight: float
    logits: float
    activations: float

    @property
    def total(self) -> float:
        return self.sharded + self.in_flight + self.logits + self.activations


def learner_memory(
    shape: ModelShape,
    learners: int,
    micro_batch_size: int,
    sequence_length: int,
    offload: bool,
    gradient_checkpointing: bool,
    reference: bool,
    lora: bool = False,
) -> LearnerMemory:
    """The learner's memory per GPU for `shape` sharded over `learners` ranks; with `lora` the
    policy is frozen (fp32 weights only: 4 bytes per parameter; the adapters not counted)."""
    per_parameter = (4 if lora else 16) + (4 if reference else 0)
    sharded = 0.0 if offload else per_parameter * shape.parameters / learners
    # bf16 weights of two layers and of the root unit, with their bf16 gradients unless frozen.
    in_flight = (2 if lora else 4) * (2 * shape.layer_parameters + shape.root_parameters)
    tokens = micro_batch_size * sequence_length
    logits = 10.0 * tokens * shape.vocab_size
    per_token_layer = 34 * shape.hidden_size
    if gradient_checkpointing:
        activations = tokens * (2 * shape.hidden_size * shape.layers + per_token_layer)
    else:
        activations = tokens * per_token_layer * shape.layers
    return LearnerMemory(sharded, in_flight, logits, float(activations))


def _gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB"


def plan(config, policy: PretrainedConfig | None, source: str) -> tuple[list[str], str | None]:
    """The placement report of an RL stage config, and why it cannot fit (None if it can).

    Args:
        config: the RL stage's resolved config (`pipelines.rl.Config`).
        policy: the policy's transformers config (the stage's `model`, or the checkpoint an
            earlier stage starts from), or None when there is none yet.
        source: where `policy` comes from, for the report ("config.json in DIR").
    """
    placement = config.placement
    lines = [
        f"learners {placement.learners} rank(s) x {placement.learner_gpus:g} GPU, "
        f"{placement.learner_cpus:g} CPU"
        + (f" ({placement.learner_threads} threads)" if placement.learner_threads else "")
        + f"; workers {placement.workers} x "
        f"{placement.worker_gpus:g} GPU, {placement.worker_cpus:g} CPU (tensor parallel "
        f"{config.engine.tensor_parallel_size}); Ray at "
        f"{placement.ray_address or 'a new local cluster'}"
    ]
    cluster = placement.cluster
    if cluster is not None:
        used = (
            placement.learners * placement.learner_gpus + placement.workers * placement.worker_gpus
        )
        lines.append(
            f"cluster  {cluster.nodes} node(s) x {cluster.gpus_per_node} GPUs of "
            f"{cluster.gpu_memory_gib:g} GiB: {used:g} of {cluster.nodes * cluster.gpus_per_node} "
            "GPUs used"
        )
    if policy is None:
        lines.append("memory   not computed: the policy's config.json is not there yet")
        return lines, None
    shape = ModelShape.from_config(policy)
    learner = config.learner
    memory = learner_memory(
        shape,
        placement.learners,
        learner.micro_batch_size,
        config.engine.max_model_len,
        learner.offload,
        learner.gradient_checkpointing,
        config.loss.kl_coef > 0,
        learner.lora.enabled,
    )
    size = shape.parameters
    count = f"{size / 1e9:.2f} B" if size >= 1e9 else f"{size / 1e6:.1f} M"
    lines.append(f"policy   {count} parameters, {shape.layers} layers ({source})")
    lines.append(
        f"learner  per GPU: {_gib(memory.total)} = sharded state {_gib(memory.sharded)}"
        f"{' (offloaded to host memory)' if learner.offload else ''} + layers in flight "
        f"{_gib(memory.in_flight)} + logits {_gib(memory.logits)} + activations "
        f"{_gib(memory.activations)} (micro-batch {learner.micro_batch_size} x "
        f"{config.engine.max_model_len} tokens)"
    )
    engine_bytes = 4 if config.engine.dtype == "float32" else 2
    worker_gpu = shape.parameters * engine_bytes / config.engine.tensor_parallel_size
    staging = shape.parameters * engine_bytes
    lines.append(
        f"worker   per GPU: weights {_gib(worker_gpu)} + KV cache; learner rank 0 stages "
        f"{_gib(staging)} of host memory for weight sync"
    )
    if cluster is None or placement.learner_gpus == 0:
        return lines, None
    usable = USABLE * cluster.gpu_memory_gib * GIB * min(1.0, placement.learner_gpus)
    if memory.total > usable:
        return lines, (
            f"the learner needs about {_gib(memory.total)} per GPU, over {USABLE:.0%} of "
            f"{cluster.gpu_memory_gib:g} GiB: add learners, set learner.offload or "
            "learner.gradient_checkpointing, or lower learner.micro_batch_size"
        )
    if placement.worker_gpus and worker_gpu > usable * placement.worker_gpus:
        return lines, (
            f"a rollout worker's weights take {_gib(worker_gpu)} per GPU, over {USABLE:.0%} "
            f"of {cluster.gpu_memory_gib:g} GiB: raise engine.tensor_parallel_size"
        )
    return lines, None
