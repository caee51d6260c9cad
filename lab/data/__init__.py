"""Tokens: the on-disk store, text corpora prepared into it, and the windows training reads."""
