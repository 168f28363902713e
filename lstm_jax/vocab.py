"""The token ids every vocabulary of lstm_jax reserves.

The data pipeline (`lstm_jax.data`) builds its tokenizers around them, and the model's word dropout writes
`UNK_ID`; they live apart so that importing the model does not import `datasets`.
"""

PAD_ID, UNK_ID = 0, 1
PAD, UNK = "[PAD]", "[UNK]"
