"""InternVL 2.5 training: data (`data.py`), loss (`loss.py`), stage presets (`stages.py`), the loop (`loop.py`).

Imports transformers lazily; install the `[train]` extra.
"""
