"""A sequence classifier: embedding, a recurrent stack, pooling and an MLP head.

``init_classifier(key, config, vocab_size, num_classes)`` returns a plain dict of
arrays and ``classifier_logits(params, config, tokens_BT, lengths_B, ...)`` is a pure
function of it. :class:`ModelConfig` is frozen and hashable, so it can be a static
argument of ``jax.jit``.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax

from lstm_jax import cli, regularisers
from lstm_jax.cells import get_cell
from lstm_jax.recurrence import init_rnn, is_bidirectional, rnn, valid_mask
from lstm_jax.vocab import PAD_ID, UNK_ID

POOLINGS = ("last", "mean", "max", "mean_max", "attention")
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and regularisation of the classifier (every field is a CLI flag in experiments)."""

    cell: str = dataclasses.field(default="lstm", metadata={"help": "recurrent cell: lstm, peephole, cifg, layer_norm, lstmp (its output, what recurs and is pooled, has --hidden-size // 2 units), gru, rnn"})
    embed_dim: int = dataclasses.field(default=300, metadata={"range": cli.AT_LEAST_1, "help": "embedding width"})
    hidden_size: int = dataclasses.field(default=256, metadata={"range": cli.AT_LEAST_1, "help": "units per direction per layer"})
    num_layers: int = dataclasses.field(default=1, metadata={"range": cli.AT_LEAST_1, "help": "stacked recurrent layers"})
    bidirectional: bool = dataclasses.field(default=True, metadata={"help": "run each layer both ways"})
    residual: bool = dataclasses.field(default=False, metadata={"help": "residual connections from layer 2 on"})
    pooling: str = dataclasses.field(default="max", metadata={"help": "last, mean, max, mean_max (both, concatenated) or attention over time"})
    head_hidden: int = dataclasses.field(default=256, metadata={"range": cli.AT_LEAST_0, "help": "hidden units of the MLP head (0: linear head)"})
    embed_dropout: float = dataclasses.field(default=0.1, metadata={"range": cli.RATE, "help": "drop whole word types from the embedding table"})
    word_dropout: float = dataclasses.field(default=0.0, metadata={"range": cli.RATE, "help": "replace input tokens by [UNK]"})
    input_dropout: float = dataclasses.field(default=0.3, metadata={"range": cli.RATE, "help": "variational dropout on the embedded inputs"})
    layer_dropout: float = dataclasses.field(default=0.3, metadata={"range": cli.RATE, "help": "dropout between recurrent layers"})
    recurrent_dropout: float = dataclasses.field(default=0.0, metadata={"range": cli.RATE, "help": "Gal & Ghahramani dropout on h"})
    zoneout: float = dataclasses.field(default=0.0, metadata={"range": cli.RATE, "help": "zoneout rate on the carry"})
    weight_drop: float = dataclasses.field(default=0.0, metadata={"range": cli.RATE, "help": "DropConnect on recurrent kernels"})
    output_dropout: float = dataclasses.field(default=0.3, metadata={"range": cli.RATE, "help": "dropout on the pooled vector before the head, and again after the head's hidden layer (--head-hidden > 0)"})
    adversarial_epsilon: float = dataclasses.field(default=0.0, metadata={"range": cli.AT_LEAST_0, "help": "also train on embedded inputs pushed this far (L2 norm per text) up the loss gradient, Miyato et al. 2017 (0: off)"})
    vat_epsilon: float = dataclasses.field(default=0.0, metadata={"range": cli.AT_LEAST_0, "help": "also train on the divergence of the prediction from itself on embedded inputs pushed this far (L2 norm per text) where it changes most: virtual adversarial training, Miyato et al. 2017; the logged training loss includes it (0: off)"})
    label_smoothing: float = dataclasses.field(default=0.0, metadata={"range": cli.RATE, "help": "mix this much of a uniform distribution into the training targets"})
    mixup_alpha: float = dataclasses.field(default=0.0, metadata={"range": cli.AT_LEAST_0, "help": "mix each text's pooled vector and label with another's of the batch, share ~ Beta(a, a), Zhang et al. 2018 (0: off)"})
    unroll: int = dataclasses.field(default=1, metadata={"range": cli.AT_LEAST_1, "help": "lax.scan unroll factor"})
    lm_weight: float = dataclasses.field(default=0.0, metadata={"range": cli.AT_LEAST_0, "help": "also train the recurrent stack as a language model with this weight: the forward direction predicts each next word, the backward one each previous word, Rei 2017; the logged training loss includes it (0: off)"})
    lm_words: int = dataclasses.field(default=2000, metadata={"range": cli.Range(2), "help": "the language-model loss tells apart the ids below this (with --tokenizer word, the most frequent words); the rest are one class"})
    lm_pretrain_epochs: int = dataclasses.field(default=0, metadata={"range": cli.AT_LEAST_0, "help": "first train the embedding and recurrent stack alone as that language model (--lm-words) for this many epochs over the training texts, then the classifier from them: the LM-LSTM of Dai & Le 2015; that run is kept in WORKDIR/pretrain (0: off)"})
    compute_dtype: str = dataclasses.field(default="float32", metadata={"help": "dtype of the model's arithmetic: float32, or bfloat16 with float32 parameters, optimiser state and loss (mixed precision, Micikevicius et al. 2018); on a CPU with AMX (Intel since Sapphire Rapids) the LSTM kernel then multiplies in bfloat16 with float32 sums, a training step takes 1.7-2.9x less time than float32's at the benchmark's shapes (README); on other CPUs the LSTM then runs as lax.scan loops, 2.6-3.2x slower than float32"})
    ensemble: int = dataclasses.field(default=1, metadata={"range": cli.AT_LEAST_1, "help": "train this many independently initialised models side by side and average their probabilities"})

    def __post_init__(self):
        cli.check_ranges(self)
        get_cell(self.cell)
        if self.cell == "lstmp" and self.hidden_size < 2:  # its projection has hidden_size // 2 units
            raise ValueError(f"--cell lstmp projects to --hidden-size // 2 units: pass --hidden-size >= 2, got {self.hidden_size}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; choose one of {', '.join(POOLINGS)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"unknown --compute-dtype {self.compute_dtype!r}; choose one of {', '.join(COMPUTE_DTYPES)}")
        if self.lm_pretrain_epochs and self.ensemble > 1:
            raise ValueError("--lm-pretrain-epochs pre-trains one model; drop --ensemble or set --lm-pretrain-epochs 0")
        if (self.lm_weight > 0 or self.lm_pretrain_epochs) and self.bidirectional and self.num_layers > 1:
            # from the second layer on, each direction reads the other's outputs, which have seen the word to predict
            raise ValueError("the language-model loss of a bidirectional stack needs --num-layers 1 (deeper, each "
                             "direction sees the words it predicts); or pass --no-bidirectional")


def _dense_init(key, fan_in, fan_out):
    return {"w": jax.nn.initializers.lecun_normal()(key, (fan_in, fan_out)), "b": jnp.zeros((fan_out,))}


def member_config(config: ModelConfig) -> ModelConfig:
    """The config of one model of an ensemble."""
    return dataclasses.replace(config, ensemble=1)


def init_classifier(key, config: ModelConfig, vocab_size: int, num_classes: int, *, language_model: bool = False) -> dict:
    """Parameters: ``embed`` (V x E), ``rnn`` (a list of layers), optional ``attention``, ``head``.

    ``lm`` holds the language-model heads of :func:`language_model_loss` when ``config.lm_weight``
    > 0 or ``language_model`` is true (for pre-training).

    With ``config.ensemble`` = K > 1 every leaf gets a leading axis of K members, each
    initialised from its own key.
    """
    if config.ensemble > 1:
        keys = jax.random.split(key, config.ensemble)
        return jax.vmap(lambda k: init_classifier(k, member_config(config), vocab_size, num_classes, language_model=language_model))(keys)
    k_embed, k_rnn, k_attn, k_hidden, k_out = jax.random.split(key, 5)
    layers = init_rnn(
        k_rnn, get_cell(config.cell), config.embed_dim, config.hidden_size,
        num_layers=config.num_layers, bidirectional=config.bidirectional,
    )  # fmt: skip
    width = rnn_width(layers)
    pooled_width = 2 * width if config.pooling == "mean_max" else width
    params = {"embed": jax.random.normal(k_embed, (vocab_size, config.embed_dim)) * 0.1, "rnn": layers}
    if config.pooling == "attention":
        params["attention"] = {**_dense_init(k_attn, width, width), "v": jnp.zeros((width,))}
    if config.head_hidden:
        params["head"] = {"hidden": _dense_init(k_hidden, pooled_width, config.head_hidden), "out": _dense_init(k_out, config.head_hidden, num_classes)}
    else:
        params["head"] = {"out": _dense_init(k_out, pooled_width, num_classes)}
    if config.lm_weight > 0.0 or language_model:
        per_direction = width // 2 if config.bidirectional else width
        k_fwd, k_bwd = jax.random.split(jax.random.fold_in(k_out, 1))
        params["lm"] = {"fwd": _dense_init(k_fwd, per_direction, config.lm_words)}
        if config.bidirectional:
            params["lm"]["bwd"] = _dense_init(k_bwd, per_direction, config.lm_words)
    return params


def language_model_loss(lm, y_BTH, tokens_BT, lengths_B, lm_words: int):
    """Mean cross-entropy of the recurrent outputs as a language model, over the valid steps.

    The forward outputs predict each next word and, for a bidirectional ``y_BTH``, the backward
    outputs predict each previous word, with the heads ``lm["fwd"]`` and ``lm["bwd"]``: the
    auxiliary objective of Rei 2017, "Semi-supervised multitask learning for sequence labeling".
    Each id below ``lm_words`` is its own class; the ids at or above it share one class, that of [PAD],
    which is never a target itself (so no id below ``lm_words`` shares their class). With the word-level
    tokenizer, whose ids are ordered by frequency, those are the rarer words; WordPiece gives its first
    ids to its alphabet and pinned ``##c`` continuation pieces, so there they are not ordered by frequency.
    """
    loss_sum, _, count = language_model_sums(lm, y_BTH, tokens_BT, lengths_B, lm_words)
    return loss_sum / jnp.maximum(count, 1.0)


def language_model_sums(lm, y_BTH, tokens_BT, lengths_B, lm_words: int):
    """``(loss_sum, correct, count)`` of :func:`language_model_loss`'s predictions over the valid steps.

    ``correct`` counts the predictions whose most likely class is the target's.
    """
    targets_BT = jnp.where(tokens_BT < lm_words, tokens_BT, PAD_ID)  # [PAD] is never a target: the rare words' class
    width = lm["fwd"]["w"].shape[0]
    valid_BT = valid_mask(lengths_B, tokens_BT.shape[1]).T
    # (outputs, their targets, valid, head): forward output t predicts word t + 1, backward output t word t - 1
    pairs = [(y_BTH[:, :-1, :width], targets_BT[:, 1:], valid_BT[:, 1:], lm["fwd"])]
    if "bwd" in lm:
        pairs.append((y_BTH[:, 1:, width:], targets_BT[:, :-1], valid_BT[:, 1:], lm["bwd"]))
    total, correct, count = 0.0, 0.0, 0.0
    for outputs, targets, valid, head in pairs:
        logits = outputs @ head["w"] + head["b"]
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        total, count = total + jnp.sum(jnp.where(valid, losses, 0.0)), count + jnp.sum(valid)
        correct = correct + jnp.sum(valid & (jnp.argmax(logits, axis=-1) == targets))
    return total, correct, count


def rnn_width(layers) -> int:
    """Output width of a recurrent stack (both directions)."""
    last = layers[-1]
    return sum(p["w_h"].shape[0] for p in (last.values() if is_bidirectional(last) else [last]))


def _mean_over_time(y_BTH, lengths_B):
    return y_BTH.sum(1) / jnp.maximum(lengths_B, 1)[:, None].astype(y_BTH.dtype)


def _max_over_time(y_BTH, valid_BT):
    return jnp.where(valid_BT[..., None], y_BTH, jnp.finfo(y_BTH.dtype).min).max(1)


def _last_over_time(y_BTH, lengths_B, bidirectional: bool):
    """The output at each row's true end; for a bidirectional ``y``, the backward half at step 0 instead."""
    end_B11 = jnp.maximum(lengths_B - 1, 0)[:, None, None]
    at_end_BH = jnp.take_along_axis(y_BTH, end_B11, axis=1)[:, 0]
    if not bidirectional:
        return at_end_BH
    half = y_BTH.shape[-1] // 2
    return jnp.concatenate([at_end_BH[:, :half], y_BTH[:, 0, half:]], axis=-1)


def _check_lengths(lengths_B, batch_size: int) -> None:
    if jnp.shape(lengths_B) != (batch_size,):
        raise ValueError(f"lengths_B must have shape ({batch_size},), one length per row; got {jnp.shape(lengths_B)}")


def pool(y_BTH: jax.Array, lengths_B: jax.Array, pooling: str, attention=None, *, bidirectional: bool) -> jax.Array:
    """Summarise a padded sequence of outputs into one vector per example.

    ``last`` reads the top layer's outputs where each direction ends: with ``bidirectional`` (``y_BTH``
    the forward and backward halves concatenated), the forward half at the true end and the backward
    half at the first step, so a residual connection into the top layer counts, which the final
    carries would leave out. Lengths above ``T`` read as ``T``, as the recurrence's step mask reads them. ``mean``
    sums over all steps, so it relies on padded steps of ``y_BTH`` being zero, as
    :func:`~lstm_jax.recurrence.rnn` emits them. ``mean_max`` concatenates the two, ``(B, 2H)``: the
    concat pooling of Howard & Ruder 2018 (ULMFiT) without its last state. Rows of length 0 (batch
    padding) pool to zeros.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    _check_lengths(lengths_B, y_BTH.shape[0])
    lengths_B = jnp.minimum(lengths_B, y_BTH.shape[1])
    valid_BT = valid_mask(lengths_B, y_BTH.shape[1]).T
    lowest = jnp.finfo(y_BTH.dtype).min
    if pooling == "last":
        pooled_BH = _last_over_time(y_BTH, lengths_B, bidirectional)
    elif pooling == "mean":
        pooled_BH = _mean_over_time(y_BTH, lengths_B)
    elif pooling == "max":
        pooled_BH = _max_over_time(y_BTH, valid_BT)
    elif pooling == "mean_max":
        pooled_BH = jnp.concatenate([_mean_over_time(y_BTH, lengths_B), _max_over_time(y_BTH, valid_BT)], axis=-1)
    else:
        scores_BT = jnp.tanh(y_BTH @ attention["w"] + attention["b"]) @ attention["v"]
        weights_BT = jax.nn.softmax(jnp.where(valid_BT, scores_BT, lowest), axis=1)
        pooled_BH = jnp.einsum("bt,bth->bh", weights_BT, y_BTH)
    return jnp.where(lengths_B[:, None] > 0, pooled_BH, jnp.zeros((), pooled_BH.dtype))


def classifier_logits(params, config: ModelConfig, tokens_BT, lengths_B, *, key=None, train=False, embed_delta_BTE=None, mixup=None, with_outputs=False):
    """Class logits ``(B, C)`` for padded token ids ``tokens_BT`` with true ``lengths_B`` (>= 1; above ``T`` reads as ``T``).

    ``embed_delta_BTE``, when given, is added to the embedded tokens before input dropout: the
    gradient with respect to it (at zero) is the gradient of the loss with respect to the inputs.
    ``mixup``, a ``(partner_B, share_B)`` pair from :func:`~lstm_jax.regularisers.mixup_partners`,
    mixes the pooled vectors of the rows before the head, the "senMixup" of Guo, Mao & Zhang 2019.
    With ``with_outputs`` it returns ``(logits_BC, y_BTH)``, the top recurrent layer's outputs too.
    For an ensemble the result is the log of the members' mean probabilities, a deep ensemble
    (Lakshminarayanan et al. 2017): its softmax is that mean.
    """
    if config.ensemble > 1:
        if mixup is not None or with_outputs:
            raise ValueError("mixup and with_outputs apply to one model: call classifier_logits for each member (over_members)")
        logits_KBC = member_logits(params, config, tokens_BT, lengths_B, key=key, train=train, embed_delta_BTE=embed_delta_BTE)
        return jax.nn.logsumexp(jax.nn.log_softmax(logits_KBC, axis=-1), axis=0) - jnp.log(config.ensemble)
    _check_lengths(lengths_B, jnp.shape(tokens_BT)[0])
    keys = jax.random.split(key, 6) if key is not None else [None] * 6
    tokens_BT = regularisers.word_dropout(keys[0], tokens_BT, config.word_dropout, unk_id=UNK_ID, train=train)
    table_VE = regularisers.embedding_dropout(keys[1], params["embed"], config.embed_dropout, train=train)
    x_BTE = table_VE[tokens_BT] if embed_delta_BTE is None else table_VE[tokens_BT] + embed_delta_BTE
    if config.compute_dtype != "float32":  # the table is gathered first, so only the looked-up rows are cast
        params, x_BTE = cast_floating({k: v for k, v in params.items() if k != "embed"}, config.compute_dtype), x_BTE.astype(config.compute_dtype)
    x_BTE = regularisers.locked_dropout(keys[2], x_BTE, config.input_dropout, train=train)
    y_BTH, _ = rnn(
        get_cell(config.cell), params["rnn"], x_BTE, lengths_B, key=keys[3], train=train,
        residual=config.residual, unroll=config.unroll, dropout=config.layer_dropout,
        recurrent_dropout=config.recurrent_dropout, zoneout=config.zoneout, weight_drop=config.weight_drop,
    )  # fmt: skip
    features_BH = pool(y_BTH, lengths_B, config.pooling, params.get("attention"), bidirectional=config.bidirectional)
    if mixup is not None:
        features_BH = regularisers.mix_rows(features_BH, *mixup)
    features_BH = regularisers.dropout(keys[4], features_BH, config.output_dropout, train=train)
    head = params["head"]
    if "hidden" in head:
        features_BH = jax.nn.relu(features_BH @ head["hidden"]["w"] + head["hidden"]["b"])
        features_BH = regularisers.dropout(keys[5], features_BH, config.output_dropout, train=train)
    logits_BC = (features_BH @ head["out"]["w"] + head["out"]["b"]).astype(jnp.float32)
    return (logits_BC, y_BTH) if with_outputs else logits_BC


def cast_floating(tree, dtype):
    """``tree`` with its floating-point leaves cast to ``dtype``; the cast's gradient flows back in the leaves' own dtype."""
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def over_members(fn, params, config: ModelConfig, key=None):
    """``fn(member_params, member_config, member_key)`` for each ensemble member, stacked on a leading axis.

    Each member gets its own key split from ``key`` (so its own dropout masks), or ``None``.
    """
    keys = jax.random.split(key, config.ensemble) if key is not None else None
    one = member_config(config)
    return jax.vmap(lambda member_params, member_key: fn(member_params, one, member_key))(params, keys)


def member_logits(params, config: ModelConfig, tokens_BT, lengths_B, *, key=None, train=False, embed_delta_BTE=None):
    """Each ensemble member's logits, ``(K, B, C)``; members draw their own dropout masks."""

    def logits_of(member_params, one, member_key):
        return classifier_logits(member_params, one, tokens_BT, lengths_B, key=member_key, train=train, embed_delta_BTE=embed_delta_BTE)

    return over_members(logits_of, params, config, key)
