"""Evaluation harness: budget-matched fine-tuning comparisons and the stability study.

- :mod:`.methods`: the compared methods and how each builds its adapter
- :mod:`.finetune`: the one training loop (same batches, steps and schedule for all)
- :mod:`.budget`: rank sums and LoRA parameter counts read off the built model
- :mod:`.classification`, :mod:`.causal_lm`: the two tasks
- :mod:`.stability`: Kendall τ-b of θ orderings across domains, sizes and training
- :mod:`.store`, :mod:`.report`: checkpointed results files, tables and plots

The command is ``sensitivity-lora evaluate`` (:mod:`sensitivity_lora.cli_evaluate`).
"""
