"""Measuring memorization before and after an edit, on prompts the edit never saw.

One concept a module: ``similarity`` (generation vs training image), ``detector`` (Wen et
al.'s ground-truth-free score), ``utility`` (what ordinary prompts lose), ``attention`` (where
cross-attention looks), ``controls`` (random mask of the same size, NeMo), ``harness``
(evaluate / sweep orchestration), ``report`` (JSON and terminal table), ``figures`` (image
grid, sweep plot) and ``cli`` (click commands).
"""
