"""The README's API tour must run as written, and what its comments claim must hold."""

import ast
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def run_readme_snippets() -> dict:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    return namespace


def test_readme_python_snippets_run():
    namespace = run_readme_snippets()
    assert namespace["grads"][0]["fwd"]["w_h"].shape == (32, 128)


def test_readme_comments_hold():
    ns = run_readme_snippets()
    lj, params, x_BTE, lengths_B = ns["lj"], ns["params"], ns["x_BTE"], ns["lengths_B"]
    text = README.read_text()

    # `params = lj.LSTM.init(...)  # {"w_x": (8, 128), ...}` and `# Carry(h=(4, 32), c=(4, 32))`
    claimed = ast.literal_eval(re.search(r"lj\.LSTM\.init\(key, 8, 32\)\s+# (\{.*\})", text).group(1))
    assert {k: v.shape for k, v in params.items()} == claimed
    h_shape, c_shape = map(ast.literal_eval, re.search(r"# Carry\(h=(\(.*?\)), c=(\(.*?\))\)", text).groups())
    carry = lj.LSTM.init_carry(params, batch_shape=(4,))
    assert (carry.h.shape, carry.c.shape) == (h_shape, c_shape)

    # "padded steps of y are zero", in training (dropouts on) and in evaluation
    valid_BT = np.arange(x_BTE.shape[1])[None, :] < np.asarray(lengths_B)[:, None]
    train_y, _ = lj.rnn(lj.LSTM, ns["layers"], x_BTE, lengths_B, key=ns["key"], train=True, dropout=0.2,
                        recurrent_dropout=0.1)  # fmt: skip
    for y in (train_y, ns["y_BTH"]):
        np.testing.assert_array_equal(np.asarray(y)[~valid_BT], 0.0)

    # "also works unbatched, and under vmap"
    _, y_B = lj.LSTM.step(params, carry, x_BTE[:, 0])
    _, y_one = lj.LSTM.step(params, lj.LSTM.init_carry(params), x_BTE[0, 0])
    _, y_vmap = jax.vmap(lj.LSTM.step, in_axes=(None, 0, 0))(params, carry, x_BTE[:, 0])
    np.testing.assert_allclose(y_one, y_B[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y_vmap, y_B, rtol=1e-6, atol=1e-6)

    # "an initial carry without batch axes ... broadcasts over the batch"
    start = lj.Carry(jnp.full((32,), 0.3), jnp.full((32,), -0.2))
    layer = [params]
    y_broadcast, _ = lj.rnn(lj.LSTM, layer, x_BTE, lengths_B, initial_carries=[start])
    y_tiled, _ = lj.rnn(
        lj.LSTM, layer, x_BTE, lengths_B, initial_carries=[jax.tree.map(lambda a: jnp.tile(a, (4, 1)), start)]
    )
    np.testing.assert_array_equal(y_broadcast, y_tiled)

    # Defaults: forget-gate bias 1.0, one orthogonal recurrent block per gate, LeCun-normal input kernels, float32
    np.testing.assert_array_equal(
        np.asarray(params["b"]).reshape(4, 32), np.repeat([[0.0], [1.0], [0.0], [0.0]], 32, 1)
    )
    for block in np.split(np.asarray(params["w_h"], np.float64), 4, axis=1):
        np.testing.assert_allclose(block.T @ block, np.eye(32), atol=1e-5)
    wide = lj.LSTM.init(jax.random.key(1), 2000, 64)["w_x"]
    assert abs(float(np.std(wide)) * np.sqrt(2000) - 1.0) < 0.02
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    assert lj.LSTM.init(ns["key"], 8, 32, dtype=jnp.bfloat16)["w_h"].dtype == jnp.bfloat16

    # every `lj.NAME` the README uses is exported
    for name in set(re.findall(r"\blj\.([A-Za-z_]+)", text)):
        assert name in lj.__all__, name
