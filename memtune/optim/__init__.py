"""Optimizer families memtune swaps in place of the script's own (one family a module), the swap machinery
(`swap.py`), and the stepping helpers that run an optimizer's own update on stand-in tensors (`stepping.py`).

The `optimizer` plan section (memtune/strategies/optimizers.py) chooses among them; this package knows
nothing of plans or the cost model.
"""
