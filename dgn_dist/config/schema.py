"""Typed configuration: one dataclass per component.

Every field carries its documentation in ``metadata["help"]``; fields typed with ``Literal``
accept only the listed choices. TOML files in ``configs/`` have one table per dataclass
(``[run]``, ``[data]``, ...). This module imports nothing heavy (no torch) so that a bad
configuration is reported before any expensive import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


def doc(default: Any, help: str) -> Any:  # noqa: A002 - "help" mirrors argparse
    """A dataclass field with a default and its documentation."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class RunConfig:
    name: str = doc("run", "Run name; the default run directory is runs/<name>-<timestamp>.")
    dir: str = doc("", "Run directory (TensorBoard events, config, checkpoints, summary.json); "
                   "empty = runs/<name>-<timestamp>.")
    seed: int = doc(0, "Seed for data split, initialisation, data order and sampling.")
    epochs: int = doc(10, "Number of training epochs.")
    max_steps: int = doc(0, "Stop after this many optimizer steps (0 = no limit).")
    device: Literal["auto", "cpu", "cuda"] = doc("auto", "Device; auto = cuda when available.")
    deterministic: bool = doc(True, "Use deterministic algorithms (bit-exact reruns on CPU).")
    quiet: bool = doc(False, "No progress bar (it is also off when stdout is not a TTY).")
    resume: str = doc("", "Resume from a checkpoint: '' (fresh run), 'latest' (newest "
                      "checkpoint in run.dir) or a checkpoint path.")
    eval_every: int = doc(1, "Evaluate on the test split every N epochs (the last epoch always).")
    cpu_allocator: Literal["retain", "system"] = doc(
        "retain", "CPU memory (glibc malloc): retain = keep freed memory for reuse, so that "
        "the large per-step blocks are not page-faulted in again each step (faster on CPU; "
        "the process keeps its peak); system = glibc's defaults (dgn_dist/allocator.py).")


@dataclass
class DataConfig:
    dataset: Literal["digits", "mnist", "svhn", "cifar10", "cifar100", "synthetic"] = doc(
        "digits", "Data set. digits ships with scikit-learn; mnist/svhn/cifar* are read from "
        "data.root in torchvision's on-disk format; synthetic is generated.")
    root: str = doc("data", "Folder holding the torchvision-format data sets.")
    download: bool = doc(False, "Let torchvision download missing data sets (needs internet).")
    batch_size: int = doc(8, "Global training batch size.")
    eval_batch_size: int = doc(256, "Batch size for evaluation.")
    val_fraction: float = doc(0.1, "Fraction of the training split held out for validation "
                              "(hyper-parameter tuning and bandit rewards; never the test set).")
    test_fraction: float = doc(0.2, "digits only: fraction of the 1797 images in the test split.")
    augment: Literal["auto", "none", "crop_flip"] = doc(
        "auto", "Training augmentation; auto = crop_flip for cifar100 (as the paper), else none.")
    num_workers: int = doc(0, "DataLoader worker processes.")
    synthetic_shape: list[int] = doc([3, 32, 32], "synthetic: image shape [C, H, W].")
    synthetic_classes: int = doc(10, "synthetic: number of classes.")
    synthetic_train_size: int = doc(2048, "synthetic: number of training images.")
    synthetic_test_size: int = doc(512, "synthetic: number of test images.")
    loader: Literal["torch", "ffcv"] = doc(
        "torch", "Data loader: torch (in-memory tensors, torch DataLoader) or ffcv (.beton "
        "files written by `dgn-data write-beton`; cifar10/cifar100/svhn/synthetic; needs the "
        "ffcv extra, see README). With ffcv, num_workers is FFCV's thread count (0 = all cores).")
    beton_train: str = doc("", "ffcv: training .beton; empty = <data.root>/ffcv/<dataset>_train"
                           ".beton. The validation split (val_fraction) is carved from it.")
    beton_test: str = doc("", "ffcv: test .beton; empty = <data.root>/ffcv/<dataset>_test.beton.")


@dataclass
class ModelConfig:
    name: Literal["digits_resnet", "mnist_resnet", "svhn_resnet", "table3_cnn", "coop_cnn",
                  "resnet18", "mlp"] = doc("digits_resnet", "Model from the registry (App. E.1).")
    activation: Literal["auto", "tanh", "relu"] = doc(
        "auto", "Activation; auto = the paper's choice for the model (tanh for digits_resnet).")
    width: int = doc(0, "Feature maps per conv (0 = the paper's value for the model).")
    shortcut: Literal["identity", "conv"] = doc(
        "identity", "digits_resnet/mnist_resnet/svhn_resnet: identity shortcuts (App. E.1, "
        "Table 2) or a 1x1-conv shortcut in every residual block (Fig. 2's shortcut module: "
        "its player makes the alignment of Fig. 8a change the game, Table 4).")


@dataclass
class OptimConfig:
    name: Literal["sgd", "rmsprop", "adam", "ekfac", "emsa", "dgnopt"] = doc(
        "sgd", "Optimizer.")
    lr: float = doc(0.1, "Learning rate.")
    momentum: float = doc(0.0, "Momentum (sgd, rmsprop).")
    weight_decay: float = doc(0.0, "Weight decay; for dgnopt the stage cost l = wd/2 |theta|^2.")
    betas: list[float] = doc([0.9, 0.999], "Adam betas.")
    eps: float = doc(1e-8, "Adam/RMSprop epsilon.")
    alpha: float = doc(0.99, "RMSprop smoothing constant.")
    lr_schedule: Literal["constant", "multistep"] = doc("constant", "Learning-rate schedule.")
    milestones: list[int] = doc([], "multistep: epochs at which the lr is multiplied by gamma.")
    gamma: float = doc(0.1, "multistep: decay factor.")
    emsa_rho: float = doc(0.5, "EMSA: feasibility penalty rho of the augmented Hamiltonian "
                          "(eq. 35).")
    emsa_lbfgs_iters: int = doc(4, "EMSA: L-BFGS iterations per layer and step.")
    emsa_line_search: bool = doc(False, "EMSA: strong-Wolfe line search in L-BFGS (lr is "
                                 "then the initial step; off: lr is the step length).")
    ekfac_kl_clip: float = doc(1e-3, "EKFAC: KL clipping of the preconditioned step (Ba et "
                               "al. 2017), nu = min(1, sqrt(c / (lr^2 <d, g>))); 0 = off (the "
                               "plain step of George et al. 2018).")
    dgnopt_kl_clip: float = doc(0.0, "dgnopt: EKFAC's KL clipping applied to the whole step "
                                "lr * (k + K dx): lr is scaled by nu = min(1, sqrt(c / (lr^2 "
                                "<k, Q_theta>))) each step; 0 = off.")


@dataclass
class CurvatureConfig:
    kind: Literal["identity", "diag", "kfac", "ekfac"] = doc(
        "ekfac", "Parameter curvature Q_theta_theta (EKFAC optimizer and DGNOpt players).")
    damping: float = doc(1e-3, "Damping added to the curvature (Tikhonov).")
    damping_decay: float = doc(1.0, "Damping multiplied by this factor every epoch "
                               "(1.0 = constant damping).")
    damping_min: float = doc(1e-6, "Floor for a decaying damping.")
    ema_decay: float = doc(0.95, "Exponential moving average decay of the Kronecker factors.")
    factor_interval: int = doc(1, "Update the Kronecker factors every N steps.")
    inverse_interval: int = doc(20, "Recompute inverses / eigenbases every N steps.")
    rescale: bool = doc(True, "dgnopt with kfac/ekfac: scale a block's curvature up where its "
                        "quadratic model lies below the batch Gauss-Newton model along its "
                        "step (keeps k, K and V_xx consistent; no effect where exact).")
    chunk_mb: float = doc(0.0, "dgnopt: memory in MiB of one chunk of per-sample gradients "
                          "(the EKFAC scaling, the Gram matrix and the rescaling run over the "
                          "batch in chunks of this size). Larger chunks launch fewer kernels, "
                          "which a GPU step is bound by, and can raise the peak memory by up "
                          "to three chunks. 0 = auto: 64 on the CPU, 256 on a GPU.")
    vxx: Literal["empirical", "sampled", "exact"] = doc(
        "empirical", "dgnopt: terminal V_xx factors (DESIGN.md section 3).")
    rank: int = doc(1, "dgnopt: rank r of the per-sample V_xx factors (sampled: r samples; "
                    "exact: r = number of classes; empirical: 1).")


@dataclass
class GameConfig:
    info: Literal["olne", "fne", "gr"] = doc(
        "fne", "Information structure: olne (back-propagation), fne (feedback Nash), "
        "gr (cooperative, group rational).")
    alignment: Literal["first", "second"] = doc(
        "second", "Residual blocks: align the shortcut with the block's first or second "
        "layer (Fig. 8a).")
    players_per_layer: int = doc(1, "Fictitious players per layer (eq. 16).")
    feedback_scale: float = doc(1.0, "Multiplies the feedback K dx in the update pass "
                                "(0 turns the feedback off).")
    feedback_consistency: bool = doc(
        False, "dgnopt fne/gr: scale the curvature of the closed-loop terms (K, V_x, V_xx) of "
        "each stage by s = max(1, max_b lambda_max(Gamma_b)), so that K dx never over-corrects "
        "and V_xx stays PSD without clipping; the open gain k is unchanged (DESIGN.md 2.3).")
    alignment_strategy: Literal["fixed", "random", "adaptive"] = doc(
        "fixed", "dgnopt: the alignment of each step (Alg. 2, Table 4): fixed = game.alignment "
        "always; random = uniform per step; adaptive = EXP3++ bandit (Alg. 3) rewarded with "
        "the accuracy on a held-out validation batch after the step.")
    reward_batch_size: int = doc(128, "random/adaptive alignment: validation images per "
                                 "bandit reward (Alg. 2); batches cycle through data.val.")
    ablation: Literal["none", "sgd", "rmsprop", "adam", "ekfac"] = doc(
        "none", "dgnopt: the Fig. 6 ablation (DESIGN.md 2.3): the named baseline's "
        "preconditioner as the parameter curvature (sgd: I; rmsprop: optim.alpha/eps; adam: "
        "optim.betas/eps; ekfac: [curvature]) with the closed loop of game.info (fne/gr keep "
        "Q_theta_x; olne reproduces the baseline); overrides curvature.kind.")
    ablation_consistency: bool = doc(
        True, "game.ablation with fne/gr: keep the baseline's open step but scale the "
        "curvature of the feedback K dx and of V_x/V_xx up to the per-sample Gauss-Newton "
        "curvature (s = max(1, max_b lambda_max(Gamma_b)) per stage), so the closed loop "
        "never over-corrects; false = the baseline's preconditioner in every term (unstable "
        "when it lies below the Gauss-Newton curvature, e.g. SGD at a wide head).")


@dataclass
class ParallelConfig:
    dp: int = doc(0, "Data-parallel degree (0 = world size / pp).")
    pp: int = doc(1, "Pipeline-parallel degree (number of stage shards).")
    micro_batches: int = doc(1, "Pipeline: micro-batches per step and dp replica (GPipe); the "
                             "per-replica batch must be divisible by it.")
    pipeline_mode: Literal["exact", "stale_k"] = doc(
        "exact", "Pipeline: exact = bulk-synchronous sweep per stage (equals one process); "
        "stale_k = the sweep propagates V_x/V_xx with the previous step's open gain k and "
        "curvature so micro-batches stream (the update still uses the fresh k).")
    partition: str = doc("uniform", "Pipeline: stages per pp rank: uniform, params (balance "
                         "parameter counts) or a comma list of stage counts, e.g. '3,2'.")
    feedback_ahead: bool = doc(
        True, "Pipeline: each rank runs the update pass's feedback forwards (the stage forwards "
        "at the old parameters whose graphs K δX is pulled back through) while it waits for "
        "the sweep's messages and for δX, instead of after δX arrives. Same results; on "
        "ResNet-18 (batch 64, pp=2, CPU) a 3-4 % shorter step (stale_k and exact) for "
        "200-350 MiB more peak memory on the first rank, which holds those graphs until its "
        "update.")
    backend: Literal["auto", "gloo", "nccl"] = doc(
        "auto", "torch.distributed backend; auto = nccl on CUDA, gloo on CPU.")
    grad_worker_fraction: float = doc(
        1.0, "Fraction of the dp ranks that compute each player's eigendecompositions "
        "(KAISA): 1 = every rank computes everything (no broadcast), 1/dp = each player's two "
        "factors on one rank, chosen greedily by cost n^3, then broadcast. Must be d/dp with d "
        "dividing dp.")
    bucket_mb: float = doc(4.0, "All-reduce bucket size in MiB (gradients, Kronecker factors, "
                           "cross factors are flattened into buckets of this size).")
    precision: Literal["auto", "fp32", "bf16"] = doc(
        "auto", "Forward precision: bf16 = torch.autocast(bfloat16) around the model forward "
        "and loss (curvature and eigendecompositions stay float32); auto = bf16 when the "
        "launcher asks for it (accelerate --mixed_precision bf16, a DeepSpeed JSON with "
        "bf16.enabled), else fp32.")
    grad_clip: float = doc(0.0, "Clip the global gradient norm to this value (0 = off); for "
                           "dgnopt the norm of Q_theta over all players scales the step. A "
                           "DeepSpeed JSON's gradient_clipping sets it when this is 0.")
    deepspeed_config: str = doc(
        "", "DeepSpeed JSON (configs/deepspeed/*.json) whose precision (bf16/fp16) and "
        "gradient_clipping the run honours; its ZeRO section is validated but optimizer "
        "states stay replicated (DGNOpt and the baselines reduce through torch.distributed).")
    timeout_s: float = doc(600.0, "Collective timeout in seconds: a rank that waits longer "
                           "(a peer died or hangs) fails instead of hanging.")


@dataclass
class LoggingConfig:
    tensorboard: bool = doc(True, "Write TensorBoard event files into the run directory.")
    log_every: int = doc(10, "Write step scalars every N steps.")
    curvature_every: int = doc(50, "Write curvature statistics every N steps (0 = never).")
    hist_every: int = doc(0, "Write histograms of the Kronecker factors' eigenvalues "
                          "(curvature/<player>/{A,G}_eig; dgnopt, ekfac) every N steps "
                          "(0 = never).")


@dataclass
class CheckpointConfig:
    every_steps: int = doc(0, "Write a checkpoint every N steps (0 = at the end of each "
                           "epoch only).")
    keep_last: int = doc(2, "Number of step checkpoints kept (the final one is always kept).")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    curvature: CurvatureConfig = field(default_factory=CurvatureConfig)
    game: GameConfig = field(default_factory=GameConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
