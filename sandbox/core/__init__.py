"""The method: MAR with a per-token head, read in the order it runs.

    contracts.py    the plugin kinds (Tokenizer, Ordering, Head, Dataset) and their shapes
    transformer.py  the bidirectional encoder-decoder: visible tokens + class buffer -> a condition per position
    adaln_mlp.py    the heads' network (SimpleMLPAdaLN)
    model.py        transformer + head, and the training loss that joins them
    training.py     one training step: images -> latents -> tokens -> split -> loss; backward, clip, AdamW
    sampling.py     the sampling loop: the ordering's plan -> transformer -> head.sample -> tokenizer.decode
    schedules.py    the cosine reveal schedule and the guidance schedule
    checks.py       the cheap checks the cores make on plugins (one error line naming a broken plugin)

Nothing here measures time or picks a kernel: the speed paths live in ``sandbox.fast``.
"""
