"""Structured configuration: dataclasses registered with Hydra; the YAML files in ``conf/`` only pick presets.

Every field has a one-line comment that says what it does. ``compose(overrides)`` builds the same config the
CLI would, for notebooks and tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig


@dataclass
class ModelConfig:
    name: str = MISSING  # the preset's name (model=<name>)
    source: str | None = (
        None  # a hub id or local folder to load instead of training (e.g. EleutherAI/pythia-70m-deduped)
    )
    n_layers: int = 2  # transformer blocks
    d_model: int = 128  # residual stream width
    n_heads: int = 4  # attention heads
    d_mlp: int = 512  # MLP hidden width
    rotary_pct: float = 0.25  # fraction of each head's dims that get rotary embeddings (Pythia: 0.25)
    max_position: int = 2048  # longest context the model supports
    seq_len: int = 64  # training context length
    attn_implementation: str = "eager"  # eager | sdpa (eager is faster at the tiny sizes)
    # the weights' dtype when a stage loads a checkpoint, whatever its stored one: float32 | bfloat16 | float16
    dtype: str = "float32"


@dataclass
class PlantedConfig:
    step: int | None = None  # the training step from which the planted construction is in the batches (None: off)
    construction: str = "agreement"  # agreement: its own nouns and verbs (sfcd/data/planted.py), a control beside it
    weight: float = 0.1  # the planted construction's weight in corpus.mixture (in the batches from `step` on)
    control_weight: float = 0.1  # the control's weight (in the batches from the start, the same share throughout)


@dataclass
class CorpusConfig:
    kind: str = "agreement"  # agreement (built-in grammar) | text (a .txt/.jsonl file) | hf (a datasets name)
    n_tokens: int = 2_000_000  # training tokens to write (agreement: generated; text/hf: at most this many)
    val_tokens: int = 100_000  # held-out tokens
    seed: int = 0  # generator seed
    mixture: dict[str, float] = field(
        default_factory=lambda: {
            "simple": 0.2,
            "pp": 0.24,
            "pp2": 0.01,
            "orc": 0.2,
            "orc_pp": 0.016,
            "src": 0.13,
            "conj": 0.025,
            "copy": 0.3,
        }
    )  # weights of the sentence kinds and of repeated random spans ("copy"); rare kinds are learned later
    sentences_per_doc: list[int] = field(default_factory=lambda: [1, 6])  # min and max lines per document
    copy_len: list[int] = field(default_factory=lambda: [6, 16])  # min and max words of a repeated span
    vocab_size: int = 1024  # BPE vocabulary of the tokenizer trained on the corpus
    tokenizer: str | None = None  # use this hub id / folder's tokenizer instead of training one
    path: str | None = None  # kind=text: a .txt file (blank-line separated documents) or .jsonl file
    text_field: str = "text"  # the text column of .jsonl rows and datasets
    dataset: str | None = None  # kind=hf: a Hugging Face datasets name (needs the network unless cached)
    dataset_config: str | None = None  # kind=hf: the dataset's config name
    split: str = "train"  # kind=hf: the split to stream
    task_pairs: int = 400  # contrastive pairs generated per agreement task (before the train/test split)
    test_fraction: float = 0.5  # share of the pairs in the test split
    induction_pairs: int = 200  # rows of the induction task
    induction_len: int = 10  # words in an induction task's span
    # a construction that enters the training batches at a chosen step, and a control present from the start
    # (agreement corpus only; off by default): corpus.planted.step=300
    planted: PlantedConfig = field(default_factory=PlantedConfig)


@dataclass
class CheckpointConfig:
    log_until: int = 512  # checkpoints at 0, 1, 2, 4, ... up to this step (Pythia: 512)
    every: int = 250  # then one every this many steps (Pythia: 1000)
    extra: list[int] = field(default_factory=list)  # more steps to checkpoint


@dataclass
class TrainConfig:
    steps: int = 1500  # optimizer steps
    batch_size: int = 64  # sequences per step
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decay down to lr * this (Pythia: 0.1)
    warmup_frac: float = 0.01  # linear warmup as a fraction of steps (Pythia: 0.01)
    weight_decay: float = 0.1  # AdamW weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # Adam betas (Pythia)
    grad_clip: float = 1.0  # gradient norm clip
    seed: int = 0  # weight init and data order
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval_pairs: int = 200  # test pairs per task scored at each checkpoint
    eval_batches: int = 8  # held-out batches for the held-out loss


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"  # Lightning accelerator: cpu | gpu | auto
    devices: Any = 1  # Lightning devices
    strategy: str = "auto"  # Lightning strategy: auto | ddp | ...
    precision: str = "32-true"  # Lightning precision: 32-true | bf16-mixed | ...
    threads: int = 0  # torch CPU threads (0: torch's default)
    log_every_n_steps: int = 10  # Lightning's logging interval: each SAE's MSE and L0 read from the device and logged


@dataclass
class TranscoderConfig:
    """The transcoders' settings where they differ from the SAEs' (None: the SAE setting)."""

    k: int | None = None
    d_sae: int | None = None
    expansion: int | None = None  # d_sae = expansion * d_in (sparsify's default is 32)
    lr: float | None = None
    aux_coeff: float | None = None
    dead_tokens: int | None = None
    seed: int | None = None
    skip: bool = True  # the affine skip path W_skip x (Paulo et al. 2025; sparsify's skip_connection)
    init_from: str | None = None  # a transcoders/step<N> folder to warm-start from (the study's sae.init=previous)


@dataclass
class SAEConfig:
    architecture: str = "topk"  # relu | topk | batchtopk | jumprelu
    sites: list[str] = field(default_factory=lambda: ["all"])  # site names, or "all" (embed + attn/mlp/resid per layer)
    expansion: int = 8  # d_sae = expansion * d_in (unless d_sae is set)
    d_sae: int | None = None  # dictionary size
    k: int = 32  # topk/batchtopk: active latents per token
    l1_coeff: float = 5.0  # relu: L1 (times decoder norm) coefficient, on inputs scaled to E||x|| = sqrt(d_in)
    l1_warmup: float = 0.05  # relu: fraction of steps over which the L1 coefficient ramps up
    l0_coeff: float = 1.0  # jumprelu: L0 coefficient, on inputs scaled to E||x|| = sqrt(d_in)
    bandwidth: float = 0.05  # jumprelu: straight-through kernel width
    threshold_init: float = 0.5  # jumprelu: initial threshold (scaled units)
    aux_coeff: float = 0.03125  # topk/batchtopk: AuxK coefficient (1/32)
    dead_tokens: int = 100_000  # a latent silent for this many training tokens is dead (AuxK, resampling)
    resample_every: int = 0  # relu, relu_reference: resample dead features every this many steps (0: never)
    resample_tokens: int = 3_276_800  # relu_reference: fresh tokens for its dead criterion (50 x 65,536)
    resample_density: float = 10**-5.5  # relu_reference: resampled when firing less often than this
    schedule_scale: float = 1.0  # relu_reference: one factor on resample_every and resample_tokens (scaled runs)
    lr: float = 1e-3  # Adam learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam betas
    warmup_frac: float = 0.02  # linear lr warmup, fraction of steps
    decay_frac: float = 0.2  # linear lr decay to 0 over this last fraction of steps
    grad_clip: float = 1.0  # per-SAE gradient norm clip
    # torch.compile each ReLU SAE's training loss (forward and backward; the first two steps compile): 1.32x on the
    # CPU (bench_sae.py, compile_speedup). Other architectures train eager (SAE.compiles: TopK's host-side choices
    # recompile, JumpReLU measured slower). Results equal the eager ones to float32 rounding, not bit for bit
    compile: bool = False
    batch_size: int = 4096  # activations per step
    n_tokens: int = 1_000_000  # training activations per site (memory does not grow with it; files repeat epochs)
    buffer_tokens: int = 262_144  # activations per site held at once: one streamed chunk, shuffled (bounds memory)
    buffer_dtype: str = "float32"  # float32 | bfloat16: the buffer's and the on-disk cache's values
    eval_tokens: int = 32_768  # held-out tokens for evaluation (reconstruction, density), one site at a time
    ce_tokens: int | None = None  # held-out tokens for the CE/KL scores with the SAE spliced in (None: eval_tokens,
    # 0: none)
    seq_len: int | None = None  # harvest context length (None: the model preset's seq_len)
    harvest_batch: int = 32  # sequences per harvesting forward pass
    # make the next chunk on a background thread (its own CUDA stream) while training reads this one: auto (on a
    # GPU only) | true | false. Memory is two chunks instead of one
    prefetch: Any = "auto"
    # the training harvest's forward passes under torch.autocast: auto (on a GPU with a float32 model: the
    # checkpoint's stored 16-bit dtype, else bfloat16) | none | bfloat16 | float16. Evaluation runs in model.dtype
    harvest_autocast: Any = "auto"
    exclude_special: bool = True  # leave BOS/EOS/padding positions out of training and evaluation
    cache: bool = False  # write each streamed chunk to activations/step<N>/<site>/ and reuse it (no forward pass)
    activations: str | None = None  # train on a plain activation file (.npy/.safetensors [N, d]) instead of a model
    seed: int = 0  # initialisation and batch order
    sweep: dict[str, list[Any]] = field(default_factory=dict)  # grid of hyperparameters trained in one stream
    per_site: dict[str, Any] = field(default_factory=dict)  # settings by site name or kind: {embed: {k: 2}}
    checkpoint_every: int = 200  # steps between resumable states
    checkpoint_minutes: float = 0.0  # > 0: a resumable state every this many minutes instead (by measured step time)
    init: str = "random"  # random | previous (study: warm-start from the previous checkpoint's SAE)
    init_from: str | None = None  # a saes/step<N> folder to warm-start from (set by the study for init=previous)
    # site-parallel: the sites split into `shards` shards (every shards-th site), this job training shard `shard`
    # from its own stream, with no gradient traffic; one job per GPU (README, Pythia): sae.shards=4
    # sae.shard=0,1,2,3 'trainer.devices=[${sae.shard}]' hydra/launcher=joblib. Each SAE is the unsharded job's.
    shards: int = 1
    shard: int = 0
    # transcoders, trained from the same activation stream as the SAEs (one forward pass feeds both): the MLPs
    # (output sites, "mlp" for every layer, or mlp.<l>) to replace by a TopK (skip) transcoder from mlp_in.<l>
    # to mlp.<l>, written to transcoders/step<N>/mlp.<l>/ in sparsify's transcode layout
    transcoders: list[str] = field(default_factory=list)
    transcoder: TranscoderConfig = field(default_factory=lambda: TranscoderConfig())


@dataclass
class FeaturesConfig:
    saes: list[str] = field(default_factory=lambda: ["all"])  # SAE names under saes/step<N>/, or "all"
    transcoders: bool = False  # also the step's transcoders (features/step<N>/transcoders/mlp.<l>/)
    n_tokens: int = 65_536  # held-out tokens streamed through each SAE
    top_k: int = 10  # top activating contexts per feature
    quantile_contexts: int = 5  # contexts from lower quantiles per feature
    sample: int = 40  # random firings kept per feature (the pool the quantile contexts come from)
    window_left: int = 12  # tokens shown before the activating token
    window_right: int = 4  # tokens shown after it
    logit_k: int = 10  # promoted / suppressed tokens listed
    batch: int = 16  # sequences per forward pass
    ultra_low: float = 1.0e-4  # density below which a live feature belongs to the ultra-low-density group
    token_feature: float = 0.9  # share of firings on one token that marks a token feature
    shard_size: int = 256  # features per dashboard file loaded on demand (feats/shard_*.js)


@dataclass
class CircuitConfig:
    task: str = "nounpp"  # a task name of the run (corpus/tasks/<task>_<split>.jsonl) or a JSON-lines file
    split: str = "train"  # the run's split the circuit is found on (evaluation uses the other split when present)
    method: str = "ig"  # node effects: attrib | ig | exact
    steps: int = 10  # integrated-gradients steps
    aggregation: str = "sum"  # sum (over positions, mean over examples) | none (per position)
    node_threshold: float = 0.1  # |effect| above which a node is in the circuit
    edge_threshold: float = 0.01  # |weight| above which an edge is drawn
    n_examples: int = 100  # pairs used
    batch_size: int = 32  # pairs per batch
    sites: list[str] = field(default_factory=lambda: ["all"])  # dictionary sites ("all": embed + attn/mlp/resid)
    dictionary: str = "sae"  # sae | neurons (identity dictionaries: the neuron baseline)
    dictionaries: Any = None  # the run's SAEs (None), a folder (sfcd/SAELens, the paper's ae.pt release, sparsify)
    # or a mapping site -> folder; see sfcd/circuits/dictionaries.py
    transcoders: bool = False  # the run's transcoders (transcoders/step<N>/mlp.<l>) at the mlp.<l> sites, replacing
    # the MLPs; the dictionaries above elsewhere (a circuit.dictionaries folder may also hold transcoders itself)
    error_nodes: bool = True  # false: circuits without error nodes (they are always ablated)
    edges: bool = True  # compute edges between circuit nodes
    reference_edges: bool = False  # compute edges with one backward per (example, position, node), to check
    ig_batch: int = 256  # sequences per integrated-gradients forward pass (interpolation points are chunked)
    edge_items: str = "all"  # all: a kept node's edges sum over all its (example, position) items; paper: only
    # over the items whose own effect passes node_threshold (feature-circuits' rule, before aggregation)
    ablation: str = "mean"  # mean (per prefix length over the evaluation set's patch prefixes) | zero | resample
    # (another evaluation example's values, a seeded derangement over the whole evaluation set)
    lengths: str = "shortest"  # multi-length task files: shortest (the reference's load_examples rule, seed below)
    # | all (every length, each mean-ablated with its own length's mean)
    seed: int = 12  # the pairs' shuffle (12: the reference's load_examples), the discovery/eval split, resample
    eval_task: str | None = None  # a separate evaluation file (else the run's other split, else a seeded split)
    eval_fraction: float = 0.5  # share of a lone task file's usable pairs held out for evaluation
    resolve_z: float = 3.0  # faithfulness only where |F(M) - F(empty)| > resolve_z x its paired standard error
    resolve_floor: float = 0.05  # ... and > this (logits); else faithfulness/completeness null, resolvable false
    sweep_points: int = 15  # node thresholds in logspace(-4, 0) for the faithfulness curve
    baselines: bool = True  # also sweep neurons and no-error-node circuits for the curve
    out_dir: str | None = None  # where the circuit is written (None: circuits/<task>/step<N>)


@dataclass
class CrosscoderConfig:
    steps: list[int] = field(default_factory=list)  # checkpoints read jointly, in order (empty: study.steps)
    sites: list[str] = field(default_factory=lambda: ["resid"])  # sites (a kind alone: every layer's; one
    # crosscoder per site)
    architecture: str = "batchtopk"  # batchtopk (Minder et al.'s recommendation) | l1 (sum of decoder norms)
    expansion: int = 8  # latents = expansion * d (the width of one checkpoint's activations)
    k: int = 16  # batchtopk: active latents per token (on average over the batch)
    l1_coeff: float = 2.0  # l1: coefficient of sum_i f_i sum_m ||W_dec,i^m|| (normalised inputs)
    l1_warmup: float = 0.05  # l1: fraction of steps over which the coefficient ramps up
    lr: float = 0.001  # Adam learning rate
    batch_size: int = 1024  # tokens per step (each K x d)
    n_tokens: int = 250_000  # training tokens (memory does not grow with it)
    buffer_tokens: int = 131_072  # tokens held at once (one streamed chunk of K x d per token)
    eval_tokens: int = 16_384  # held-out tokens for FVE, densities and Latent Scaling
    ce_tokens: int = 8_192  # held-out tokens for each checkpoint's CE loss score with its reconstruction spliced in
    seed: int = 0  # initialisation and batch order
    checkpoint_every: int = 200  # steps between resumable states
    presence: float = 0.3  # present at a checkpoint: decoder norm >= this x the latent's largest norm
    scaling_flag: float = 0.5  # Latent Scaling flag: absent by norm, beta >= this x the strongest checkpoint's
    scaling_tokens: int = 1_048_576  # Latent Scaling (and the block means of checkpoint-alone views): training tokens
    # streamed in file order (memory does not grow with it)
    scaling_blocks: int = 20  # Latent Scaling's sums kept per block of batches (round-robin): the bootstrap's units
    scaling_resamples: int = 200  # bootstrap resamples of the blocks for the nu_eps / nu_r intervals
    circuits: bool = True  # in the study: circuits on the crosscoder's latents at crosscoder.sites, per task
    memory_limit: float = 0.0  # GiB training may hold (models, buffer, weights, grads, Adam, a batch); 0: 0.8 x the
    # device's free memory. Sites that do not fit together train one group after another; a site alone that does
    # not fit is refused before training, naming what would fit


@dataclass
class GraphConfig:
    """An attribution graph of one prompt (``sfcd graph``; circuit-tracer's method and defaults)."""

    prompt: str = "The athlete that the chefs"  # the prompt (a BOS token is put first)
    name: str | None = None  # the folder under graphs/ (None: a slug of the prompt)
    node_threshold: float = 0.8  # nodes kept to this share of the cumulative influence on the logits
    edge_threshold: float = 0.98  # edges kept to this share of the cumulative edge influence
    max_logits: int = 10  # at most this many target logits (the most probable next tokens) ...
    logit_probability: float = 0.95  # ... until their probabilities sum to this
    max_feature_nodes: int | None = None  # attribute at most this many features, the most influential (None: all)
    batch_size: int = 256  # targets per backward pass (the prompt is repeated this many times in memory)
    transcoders: str | None = None  # a folder of transcoders (mlp.<l>/ or step<N>/mlp.<l>/; None: the run's)


@dataclass
class StudyConfig:
    steps: list[int] = field(default_factory=list)  # checkpoints studied (empty: chosen from the train log)
    step_tasks: list[str] = field(default_factory=list)  # tasks whose accuracy crossings choose the steps (empty: all)
    step_thresholds: list[float] = field(default_factory=lambda: [0.6, 0.9])  # accuracy crossings that choose steps
    max_steps: int = 5  # at most this many chosen steps (before learning and the last included)
    min_step_ratio: float = 1.5  # chosen steps at least this factor apart on the log axis (study.steps: as named)
    step_margin: float = 0.05  # a crossing: accuracy >= threshold there and >= threshold - margin ever after
    tasks: list[str] = field(default_factory=lambda: ["simple", "nounpp", "rc", "within_rc"])  # circuit tasks
    seed_baseline: bool = True  # a second SAE seed at every step: the noise floor of births, deaths, shares
    features_at: str = "last"  # dashboards at: last | all (steps)
    # how features are matched across steps and seeds: activations (the correlation of what they fire on, over the
    # first match_tokens held-out tokens, each step's SAE reading its own model) or decoders (decoder cosine)
    match: str = "activations"
    match_tokens: int = 65536
    match_min_fires: int = 5  # a feature fired fewer times on that sample is not matched (as a dead one)
    shared_threshold: float = 0.7  # the similarity (correlation or cosine) at which matched features are the same
    crosscoder: bool = False  # also train crosscoders over study.steps (crosscoder.*) and follow the circuits' latents
    # transcoders at every MLP beside the SAEs (one stream), the attribution graph of an agreement prompt and of its
    # number-flipped twin at every step (graph.*), and both read through training (development.json "transcoders")
    transcoders: bool = False
    graph_task: str | None = None  # the task whose test pair is graphed (None: the first of study.tasks)
    graph_pair: int = 0  # which of its pairs (of prompts of equal length)


@dataclass
class SfcdConfig:
    name: str = "demo"  # the experiment's name; the default run directory is runs/<name>
    run_dir: str = "runs/${name}"  # where every artifact of the study lives
    step: int | None = None  # the checkpoint a stage works on (None: the last one)
    tasks: list[str] = field(default_factory=lambda: ["simple", "nounpp", "rc", "within_rc"])  # task names or files
    debug: bool = False  # show tracebacks for user-facing errors
    model: ModelConfig = field(default_factory=ModelConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    circuit: CircuitConfig = field(default_factory=CircuitConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    crosscoder: CrosscoderConfig = field(default_factory=CrosscoderConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)


def register() -> None:
    """Register the schema with Hydra's ConfigStore (idempotent)."""
    ConfigStore.instance().store(name="sfcd_schema", node=SfcdConfig)


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config the CLI would build from ``overrides`` (``key=value`` strings), without running anything."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="sfcd.conf", version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


register()


def override(cfg: DictConfig, **changes) -> DictConfig:
    """A copy of ``cfg`` with ``changes`` (dotted keys) set: one stage's config inside a study."""
    from omegaconf import OmegaConf

    c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    OmegaConf.set_struct(c, True)
    for key, value in changes.items():
        OmegaConf.update(c, key, value, merge=False, force_add=True)
    return c
