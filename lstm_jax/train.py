"""The training state and jitted train / eval steps for classifiers.

Randomness comes from ``fold_in(rng, step)``, so a run's keys depend only on its
seed and step: a resumed run draws the same dropout masks as an uninterrupted one. ``rng`` is
``fold_in(key(seed), stream)`` with a stream (:data:`STEP_STREAM` by default) that no initialiser's
``split(key(seed), n)`` reaches, so no step reuses the key that drew a weight.
A step whose loss, gradient or gradient norm is not finite (a gradient above ~1.8e19 has a
square that overflows float32, and would leave Adam's second moment infinite and those
weights frozen) is never applied, to the parameters, the optimiser state or their average;
it is counted in ``state.nonfinite_steps`` and the loop decides whether to stop.
"""

import hashlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from lstm_jax import regularisers
from lstm_jax.model import ModelConfig, classifier_logits, language_model_loss, language_model_sums, over_members
from lstm_jax.recurrence import valid_mask


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, so Orbax saves it as a plain array
    nonfinite_steps: jax.Array
    ema_params: Any = None  # exponential moving average of params, when enabled

    @property
    def eval_params(self):
        """The parameters to evaluate and predict with: the average when there is one."""
        return self.params if self.ema_params is None else self.ema_params


# split(key, n)[i] is fold_in(key, i) (threefry, partitionable), so initialisers that split key(seed)
# use its small fold-ins; the steps fold into a stream far above them.
STEP_STREAM = 0x7FFFFFFF
# Virtual adversarial training's random start, folded into a step's key: far above the small fold-ins that the
# model's split(key, n) makes for its dropouts (fold_in(key, 1) was embedding dropout's key).
VAT_STREAM = 0x56415400


def init_train_state(params, optimizer: optax.GradientTransformation, seed: int, *, ema: bool = False,
                     stream: int = STEP_STREAM) -> TrainState:  # fmt: skip
    """Step 0 of a run: ``params``, fresh optimiser state (and average, with ``ema``), and the key
    ``fold_in(key(seed), stream)`` that each step folds its index into."""
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.fold_in(jax.random.key(seed), stream)), nonfinite_steps=jnp.zeros((), jnp.int32),
        ema_params=jax.tree.map(jnp.copy, params) if ema else None,
    )  # fmt: skip


def ema_update(ema, params, decay: float, updates, applied=True):
    """Exponential moving average with the warm-up ``min(decay, (1 + t) / (10 + t))`` (the ``num_updates`` rule of
    TensorFlow's ``ExponentialMovingAverage``), ``t`` the number of ``updates`` applied so far. A step not ``applied``
    keeps the average: its rate is 1. The warm-up caps the rate below 0.999 until ``t`` = 8,990, so in a shorter run
    a larger ``decay`` changes nothing (:func:`lstm_jax.optim.run_notes` says so)."""
    # selecting the rate, not the result, leaves the averaging the same XLA fusion, so applied steps keep their bits
    rate = jnp.where(applied, jnp.minimum(decay, (1.0 + updates) / (10.0 + updates)), 1.0)
    return jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p, ema, params)


def weighted_cross_entropy(logits_BC, labels_B, weights_B, *, label_smoothing: float = 0.0, mixup=None):
    """Mean cross-entropy over rows with weight 1 (padding rows have weight 0).

    With ``label_smoothing`` > 0 the target is ``(1 - a) * one_hot + a / C`` (Szegedy et al.
    2016, "Rethinking the Inception architecture", sec. 7). With ``mixup = (partner_B, share_B)``
    each row's target is ``share`` of its own label and the rest of its partner's, and a row
    counts only when its partner is real too.
    """
    if label_smoothing > 0.0 or mixup is not None:
        targets_BC = optax.smooth_labels(jax.nn.one_hot(labels_B, logits_BC.shape[-1], dtype=logits_BC.dtype), label_smoothing)
        if mixup is not None:
            targets_BC = regularisers.mix_rows(targets_BC, *mixup)
            weights_B = weights_B * weights_B[mixup[0]]
        losses_B = optax.softmax_cross_entropy(logits_BC, targets_BC)
    else:
        losses_B = optax.softmax_cross_entropy_with_integer_labels(logits_BC, labels_B)
    return jnp.sum(jnp.where(weights_B > 0, losses_B * weights_B, 0.0)) / jnp.maximum(jnp.sum(weights_B), 1.0)


def weighted_correct(logits_BC, labels_B, weights_B):
    """Number of real (weight 1) rows whose arg-max class is the label."""
    return jnp.sum((logits_BC.argmax(-1) == labels_B) * weights_B)


def virtual_adversarial_loss(logits_at, logits_BC, weights_B, key, shape_BTE, epsilon: float, probe_logits_at=None,
                             lengths_B=None):
    """``KL(p(x) || p(x + r))`` averaged over the real rows, with ``r`` of norm ``epsilon`` per text
    along the direction that changes the prediction most, found by one power iteration from a
    random direction: virtual adversarial training (Miyato et al. 2017, "Adversarial training
    methods for semi-supervised text classification", sec. 3; Miyato et al. 2016 for VAT).

    ``logits_at(delta_BTE)`` gives the logits with ``delta_BTE`` added to the embedded inputs,
    under the dropout masks of ``logits_BC``. ``p(x)`` is treated as a constant, and so is the
    direction, as in the paper. ``probe_logits_at`` (default ``logits_at``) gives the logits
    for the power iteration: the same function with the parameters held constant keeps the
    parameter gradient first-order (the CPU kernel of ``lstm_jax.native`` then runs every pass).
    The finite difference of the power iteration is a tenth of ``epsilon``, its random start drawn
    on the real steps only where ``lengths_B`` is given (as the paper's code masks it by length), so
    that padding takes none of its norm. It needs no labels.
    """
    p_BC = jax.nn.softmax(jax.lax.stop_gradient(logits_BC))
    log_p_BC = jax.nn.log_softmax(jax.lax.stop_gradient(logits_BC))

    def divergence(delta_BTE, logits_at=logits_at):
        kl_B = jnp.sum(p_BC * (log_p_BC - jax.nn.log_softmax(logits_at(delta_BTE))), axis=-1)
        return jnp.sum(kl_B * weights_B) / jnp.maximum(jnp.sum(weights_B), 1.0)

    start_BTE = jax.random.normal(key, shape_BTE, logits_BC.dtype)
    if lengths_B is not None:
        start_BTE = jnp.where(valid_mask(lengths_B, shape_BTE[1]).T[..., None], start_BTE, 0.0)
    probe_BTE = regularisers.adversarial_perturbation(start_BTE, epsilon / 10)
    direction_BTE = jax.grad(divergence)(probe_BTE, probe_logits_at or logits_at)
    return divergence(regularisers.adversarial_perturbation(direction_BTE, epsilon))


def classifier_loss(params, config: ModelConfig, batch, key):
    """Training loss and number of correct rows for one batch.

    With ``config.adversarial_epsilon`` > 0 the loss is the mean of the clean loss and the loss on
    embedded inputs moved along their gradient (:func:`~lstm_jax.regularisers.adversarial_perturbation`),
    under the same dropout masks. Miyato et al. add the two; the mean keeps the logged loss on the
    scale of the validation loss and Adam's steps are the same, though ``--clip-norm`` then acts on
    half the summed gradient. It costs about two more passes.

    With ``config.vat_epsilon`` > 0 the loss also adds :func:`virtual_adversarial_loss` on the clean
    pass's dropout masks (about 1.7x the time of a step with adversarial training). With
    ``config.lm_weight`` > 0 it adds that weight times :func:`~lstm_jax.model.language_model_loss` of the
    clean pass's recurrent outputs.

    With ``config.mixup_alpha`` > 0 every pass mixes the pooled vectors and targets of random pairs
    of real rows (:func:`~lstm_jax.regularisers.mixup_partners`; padding rows are never partners); the
    correct count is then against each row's own label, its larger share.

    The members of an ensemble see the same batch, each with its own dropout masks
    (Lakshminarayanan et al. 2017). The loss and correct count returned are the members' means,
    but the gradient is that of their sum, so each member's gradient is the one it would get
    alone; with ``make_optimizer(..., ensemble=K)`` each member is also clipped and stepped alone.
    """
    if config.ensemble > 1:
        losses_K, correct_K = over_members(lambda p, one, k: classifier_loss(p, one, batch, k), params, config, key)
        mean_valued_sum = losses_K.sum() - jax.lax.stop_gradient(losses_K.sum() - losses_K.mean())
        return mean_valued_sum, correct_K.mean()

    mixup = None
    if config.mixup_alpha > 0.0:
        key, mixup_key = jax.random.split(key)
        mixup = regularisers.mixup_partners(mixup_key, batch.labels_B.shape[0], config.mixup_alpha,
                                            real_B=batch.weights_B > 0)

    def loss_and_logits(embed_delta_BTE, params=params):
        logits_BC, y_BTH = classifier_logits(params, config, batch.tokens_BT, batch.lengths_B, key=key, train=True, embed_delta_BTE=embed_delta_BTE, mixup=mixup, with_outputs=True)
        loss = weighted_cross_entropy(logits_BC, batch.labels_B, batch.weights_B, label_smoothing=config.label_smoothing, mixup=mixup)
        return loss, (logits_BC, y_BTH)

    delta_shape_BTE = (*batch.tokens_BT.shape, config.embed_dim)  # of a change to the embedded inputs
    # The perturbations' directions are constants of the loss, as in the papers, so they are taken with the
    # parameters held constant as well: no pass then needs second derivatives, and the CPU kernel
    # (lstm_jax.native) runs every one.
    frozen_params = jax.lax.stop_gradient(params)
    if config.adversarial_epsilon > 0.0:
        no_delta_BTE = jnp.zeros(delta_shape_BTE, params["embed"].dtype)
        loss, (logits_BC, y_BTH) = loss_and_logits(no_delta_BTE)  # XLA computes it once for this and the next line
        grad_BTE = jax.grad(lambda delta_BTE: loss_and_logits(delta_BTE, frozen_params)[0])(no_delta_BTE)
        adversarial_loss, _ = loss_and_logits(regularisers.adversarial_perturbation(grad_BTE, config.adversarial_epsilon))
        loss = (loss + adversarial_loss) / 2
    else:
        loss, (logits_BC, y_BTH) = loss_and_logits(None)
    if config.vat_epsilon > 0.0:
        logits_at = lambda delta_BTE: loss_and_logits(delta_BTE)[1][0]
        probe_logits_at = lambda delta_BTE: loss_and_logits(delta_BTE, frozen_params)[1][0]
        vat_key = jax.random.fold_in(key, VAT_STREAM)
        loss = loss + virtual_adversarial_loss(
            logits_at, logits_BC, batch.weights_B, vat_key, delta_shape_BTE, config.vat_epsilon, probe_logits_at,
            lengths_B=batch.lengths_B,
        )
    if config.lm_weight > 0.0:
        loss = loss + config.lm_weight * language_model_loss(params["lm"], y_BTH, batch.tokens_BT, batch.lengths_B, config.lm_words)
    return loss, weighted_correct(logits_BC, batch.labels_B, batch.weights_B)


def language_model_pretraining_loss(params, config: ModelConfig, batch, key):
    """Loss and aux of the embedding and recurrent stack trained alone as a language model.

    The loss is :func:`~lstm_jax.model.language_model_loss` of the outputs under the classifier's
    dropouts; the classifier head is not used. Pre-training the recurrent stack this way and then
    training the classifier from it is the LM-LSTM of Dai & Le 2015, "Semi-supervised sequence
    learning". The aux is the rows of the batch times its next-word accuracy, so that a loop that
    divides it by the rows logs that accuracy.
    """
    _, y_BTH = classifier_logits(params, config, batch.tokens_BT, batch.lengths_B, key=key, train=True, with_outputs=True)
    loss_sum, correct, count = language_model_sums(params["lm"], y_BTH, batch.tokens_BT, batch.lengths_B, config.lm_words)
    words = jnp.maximum(count, 1.0)
    return loss_sum / words, jnp.sum(batch.weights_B) * correct / words


def all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def sharpness_aware_gradient(loss_and_grad: Callable, params, batch, key, grads, rho: float, members: int = 1):
    """The gradient at ``params + rho * grads / ||grads||``, the first-order worst point within ``rho`` (L2, over all
    parameters) of ``params``: sharpness-aware minimisation (Foret et al. 2021, "Sharpness-aware minimization for
    efficiently improving generalization", eq. 3), under the same batch and dropout ``key``. ``loss_and_grad`` is
    ``value_and_grad(loss_fn, has_aux=True)``; ``grads`` are its gradients at ``params``. With ``members`` > 1 (an
    ensemble, every leaf with a leading axis of its members) each member moves ``rho`` along its own gradient, as it
    is clipped and optimised on its own."""
    tiny = jnp.finfo(jnp.float32).tiny
    if members == 1:
        scale = rho / jnp.maximum(optax.tree.norm(grads), tiny)
        moved = lambda p, g: p + (scale * g).astype(p.dtype)
    else:
        if any(g.shape[:1] != (members,) for g in jax.tree.leaves(grads)):
            raise ValueError(f"sharpness_aware_gradient: every leaf needs a leading axis of the {members} members")
        squares_K = sum(jnp.sum(jnp.square(g.astype(jnp.float32)), axis=tuple(range(1, g.ndim))) for g in jax.tree.leaves(grads))
        scale_K = rho / jnp.maximum(jnp.sqrt(squares_K), tiny)
        moved = lambda p, g: p + (scale_K.reshape(-1, *(1,) * (g.ndim - 1)) * g).astype(p.dtype)
    _, nearby_grads = loss_and_grad(jax.tree.map(moved, params, grads), batch, key)
    return nearby_grads


def make_train_step(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    *,
    ema_decay: float = 0.0,
    sam_rho: float = 0.0,
    ensemble: int = 1,
    state_sharding=None,
    batch_sharding=None,
):
    """A jitted ``(state, batch) -> (state, metrics)`` for ``loss_fn(params, batch, key) -> (loss, aux)``.

    With ``ema_decay`` > 0, ``state.ema_params`` tracks an average of the parameters; its warm-up
    counts applied updates, so a skipped step changes neither the average nor its next rate. The state
    has an average exactly when ``ema_decay`` > 0 (a ``ValueError`` otherwise).
    With ``sam_rho`` > 0 the optimiser gets :func:`sharpness_aware_gradient` instead of the gradient (a second
    forward and backward pass); the loss and aux reported are those at the parameters themselves. ``ensemble``: the
    members along the parameters' leading axis, each moved by SAM on its own.
    The input state's buffers are donated. ``state_sharding`` and ``batch_sharding``
    (see :mod:`lstm_jax.parallel`) pin the layout of the state, in and out, and of
    the batch on a device mesh; the step itself is unchanged.
    """

    def train_step(state: TrainState, batch):
        if ema_decay > 0.0 and state.ema_params is None:
            raise ValueError("ema_decay > 0 needs a state with an average: init_train_state(..., ema=True)")
        if ema_decay == 0.0 and state.ema_params is not None:  # eval_params would read the initial weights
            raise ValueError("a state with an average needs ema_decay > 0 to update it: pass ema_decay, or "
                             "init_train_state(..., ema=False)")
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        loss_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, aux), grads = loss_and_grad(state.params, batch, key)
        if sam_rho > 0.0:
            grads = sharpness_aware_gradient(loss_and_grad, state.params, batch, key, grads, sam_rho, ensemble)
        grad_norm = optax.tree.norm(grads)
        # a NaN or inf gradient makes the norm so; so do squares that overflow, which would make Adam's second moment
        # inf and freeze those weights
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep_if_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        state = state.replace(
            step=state.step + 1,
            params=keep_if_finite(params, state.params),
            opt_state=keep_if_finite(opt_state, state.opt_state),
            nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
        )
        if ema_decay > 0.0:
            ema = ema_update(state.ema_params, state.params, ema_decay, state.step - state.nonfinite_steps, finite)
            state = state.replace(ema_params=ema)
        return state, {"loss": loss, "aux": aux, "finite": finite, "grad_norm": grad_norm}

    if state_sharding is None and batch_sharding is None:
        return jax.jit(train_step, donate_argnums=0)
    return jax.jit(
        train_step,
        donate_argnums=0,
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, None),
    )


def make_eval_step(config: ModelConfig, *, params_sharding=None, batch_sharding=None):
    """A jitted ``(params, batch) -> (loss_sum, correct, count)`` in evaluation mode (shardings as in :func:`make_train_step`)."""

    def eval_step(params, batch):
        logits_BC = classifier_logits(params, config, batch.tokens_BT, batch.lengths_B)
        loss_sum = weighted_cross_entropy(logits_BC, batch.labels_B, batch.weights_B) * jnp.sum(batch.weights_B)
        correct = weighted_correct(logits_BC, batch.labels_B, batch.weights_B)
        return loss_sum, correct, jnp.sum(batch.weights_B)

    if params_sharding is None and batch_sharding is None:
        return jax.jit(eval_step)
    return jax.jit(eval_step, in_shardings=(params_sharding, batch_sharding))


def make_language_model_eval_step(config: ModelConfig):
    """A jitted ``(params, batch) -> (loss_sum, correct, count)`` of the language model over the predicted words."""

    def eval_step(params, batch):
        _, y_BTH = classifier_logits(params, config, batch.tokens_BT, batch.lengths_B, with_outputs=True)
        return language_model_sums(params["lm"], y_BTH, batch.tokens_BT, batch.lengths_B, config.lm_words)

    return jax.jit(eval_step)


def evaluate(eval_step, params, batches) -> dict:
    """Loss and accuracy over a list of batches (padding rows excluded)."""
    totals = np.zeros(3)
    for batch in batches:
        totals += np.array([float(v) for v in eval_step(params, batch)])
    loss_sum, correct, count = totals
    return {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1), "count": int(count)}


def params_sha256(params) -> str:
    """SHA-256 of the parameters' bytes, leaves in ``jax.tree`` order (sorted dict keys)."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return digest.hexdigest()
