"""The Optax chain: global-norm clipping, then AdamW with masked decay and a schedule.

Weight decay is decoupled (Loshchilov & Hutter 2019, "Decoupled weight decay
regularization") and applies only to kernels: biases, layer-norm parameters,
peephole weights, the attention score vector ``v`` and (unless asked) the embedding
table are not decayed. As in ``optax.adamw`` and PyTorch's ``AdamW``, each update
multiplies the kernels by ``1 - lr_t * weight_decay``, ``lr_t`` the scheduled learning
rate; the paper's algorithm 2 scales the decay by the schedule's factor alone, so its
``lambda`` is ``weight_decay * learning_rate`` here.
"""

import dataclasses

import jax
import optax

from lstm_jax import cli

SCHEDULES = ("cosine", "linear", "exponential", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimiser settings (every field is a CLI flag in experiments)."""

    learning_rate: float = dataclasses.field(default=2e-3, metadata={"range": cli.POSITIVE, "help": "peak learning rate"})
    schedule: str = dataclasses.field(default="cosine", metadata={"help": "decay after warm-up: cosine, linear, exponential, constant"})
    warmup_steps: int = dataclasses.field(default=200, metadata={"range": cli.AT_LEAST_0, "help": "linear warm-up steps from 0"})
    final_lr_factor: float = dataclasses.field(default=0.05, metadata={"range": cli.FRACTION, "help": "final learning rate as a fraction of the peak"})
    weight_decay: float = dataclasses.field(default=1e-4, metadata={"range": cli.AT_LEAST_0, "help": "decoupled weight decay on kernels: each update multiplies them by 1 - lr_t x this, lr_t the scheduled learning rate (optax.adamw's and PyTorch AdamW's convention; Loshchilov & Hutter's lambda is this x --learning-rate)"})
    decay_embeddings: bool = dataclasses.field(default=False, metadata={"help": "also decay the embedding table"})
    clip_norm: float = dataclasses.field(default=5.0, metadata={"range": cli.AT_LEAST_0, "help": "clip gradients to this global norm (0: off)"})
    b1: float = dataclasses.field(default=0.9, metadata={"range": cli.RATE, "help": "Adam beta1"})
    b2: float = dataclasses.field(default=0.999, metadata={"range": cli.RATE, "help": "Adam beta2"})
    ema_decay: float = dataclasses.field(default=0.999, metadata={"range": cli.RATE, "help": "evaluate an exponential moving average of the weights with this decay (0: off); its warm-up min(decay, (1 + t) / (10 + t)), t the updates so far counting this one, caps the rate below 0.999 for the first 8,989 updates, so in shorter runs larger values change nothing (a note says so)"})
    sam_rho: float = dataclasses.field(default=0.0, metadata={"range": cli.AT_LEAST_0, "help": "sharpness-aware minimisation: take each gradient at the weights moved this far (L2) along the gradient, each ensemble member along its own (0: off; about twice the time per step)"})

    def __post_init__(self):
        cli.check_ranges(self)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.schedule == "exponential" and self.final_lr_factor == 0:  # optax holds a decay rate of 0 constant
            raise ValueError("an exponential decay never reaches 0: pass --final-lr-factor > 0, or --schedule linear "
                             "or cosine to end at 0")  # fmt: skip


def run_notes(config: OptimConfig, total_steps: int) -> list[str]:
    """Notes on settings that a run of ``total_steps`` updates makes moot.

    A warm-up (cut to fit if longer) that ends at the last update, ``total_steps - 1``, or later: no update gets a
    decayed rate (constant schedule: only the last gets the full rate). An ``ema_decay`` above the average's warm-up
    cap at the last update (:func:`lstm_jax.train.ema_update`): a larger one would give the same weights.
    """
    notes = []
    if config.warmup_steps and config.warmup_steps >= total_steps - 1:
        cut = f"is cut to {total_steps - 1}" if config.warmup_steps >= total_steps else "ends at the last update"
        after = "reaches its peak only at the last update" if config.schedule == "constant" else "reaches its peak at the end and never decays"
        notes.append(f"note: --warmup-steps {config.warmup_steps} leaves no room in the schedule's {total_steps} steps: "
                     f"the warm-up {cut}, so the learning rate {after} (pass a smaller --warmup-steps)")  # fmt: skip
    ema_cap = (1 + total_steps) / (10 + total_steps)
    if ema_cap < config.ema_decay:
        notes.append(f"note: the weight average's warm-up rate, min(decay, (1 + t) / (10 + t)), stays below --ema-decay "
                     f"{config.ema_decay} for all {total_steps} steps (it ends at {ema_cap:.5f}): any --ema-decay above "
                     "that gives these same weights")  # fmt: skip
    return notes


def make_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to ``learning_rate``, then the chosen decay to ``final_lr_factor`` of it at step
    ``total_steps``. Optax counts updates from 0, so update n takes the rate at n: the first (during a warm-up) takes
    0, and the last takes the rate at ``total_steps - 1``, one step short of the final factor (cosine, factor 0.05,
    200 warm-up and 2112 steps: 0.0500007 of the peak)."""
    peak, final = config.learning_rate, config.learning_rate * config.final_lr_factor
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    decay = {
        "cosine": optax.cosine_decay_schedule(peak, decay_steps, alpha=config.final_lr_factor),
        "linear": optax.linear_schedule(peak, final, decay_steps),
        "exponential": optax.exponential_decay(peak, decay_steps, config.final_lr_factor, end_value=final),
        "constant": optax.constant_schedule(peak),
    }[config.schedule]
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params, *, decay_embeddings: bool = False):
    """True for the leaves that get weight decay: matrices named ``w*``, not peepholes or norms."""

    def decayed(path, leaf):
        names = [getattr(entry, "key", getattr(entry, "name", None)) for entry in path]
        if "embed" in names:
            return decay_embeddings
        return leaf.ndim >= 2 and str(names[-1]).startswith("w") and names[-1] != "w_peep"

    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(config: OptimConfig, total_steps: int, *, ensemble: int = 1) -> optax.GradientTransformation:
    """``clip_by_global_norm`` then AdamW with :func:`decay_mask` and :func:`make_schedule`.

    With ``ensemble`` > 1 the parameters carry a leading member axis and each member is
    optimised on its own (:func:`per_member`): its own global norm, clipping and moments.
    """
    clip = optax.clip_by_global_norm(config.clip_norm) if config.clip_norm > 0 else optax.identity()
    adamw = optax.adamw(
        make_schedule(config, total_steps), b1=config.b1, b2=config.b2, weight_decay=config.weight_decay,
        mask=lambda params: decay_mask(params, decay_embeddings=config.decay_embeddings),
    )  # fmt: skip
    optimizer = optax.chain(clip, adamw)
    return per_member(optimizer) if ensemble > 1 else optimizer


def per_member(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """``optimizer`` applied to each slice of a leading member axis separately (``vmap``)."""
    return optax.GradientTransformation(jax.vmap(optimizer.init), jax.vmap(optimizer.update))
