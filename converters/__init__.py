"""Checkpoint converters: released weights of other projects into a vlmzoo strategy's layout.

Each converter fills one strategy (``llava_hf``: transformers' llava-hf checkpoints -> ``llava``),
so it lives beside the library, not in ``vlmzoo/`` (which names no strategy) nor among the
strategies of ``architectures/``. Command lines: ``scripts/convert_*.py``.
"""
