"""Speed paths, applied to a built model from outside -- the way ``torch.compile`` is -- so the method files
(``sandbox/core``) never mention them.

    exp = sandbox.build(cfg)          # the plain PyTorch model: timm attention through SDPA, nn.Dropout, autograd
    sandbox.fast.apply(exp.model)     # the same model computed faster (the trainer and load_run do this)

Each path keeps the values within float rounding (tests/test_fast_paths.py compares both) and has its why in
its file; the measurements are in docs/performance.md:

    attention.py   explicit CPU attention for short sequences and under dropout; SDPA kernels on CUDA; xformers
    dropout.py     CPU dropout masks from 16 random bits per element
    query_rows.py  the decoder's last block at the rows the head needs only
    adaln.py       the head's residual block as one autograd function in fp32 training; timesteps embedded once
    compile.py     ``torch.compile`` of the repeated blocks and the head's sampling steps (opt-in: --compile)
    allocator.py   glibc malloc thresholds so large CPU tensors stop page-faulting (the CLI sets them at start)

``train.fast_paths: false`` (and ``--fast_paths false`` on sample, eval and bench) runs the plain path.
"""
from __future__ import annotations

from timm.layers import Attention
from torch import nn

from sandbox.core.adaln_mlp import ResBlock, TimestepEmbedder
from sandbox.core.transformer import MARBackbone
from sandbox.fast.adaln import FusedTrainingResBlock, UniqueTimestepEmbedder
from sandbox.fast.attention import FastAttention, set_attention_backend
from sandbox.fast.dropout import replace_dropout
from sandbox.fast.query_rows import QueryRowsBackbone

# plain module class -> its fast twin (a subclass with the same parameters: swapping the class keeps the
# weights, names and checkpoints)
TWINS: dict[type, type] = {
    MARBackbone: QueryRowsBackbone,
    ResBlock: FusedTrainingResBlock,
    TimestepEmbedder: UniqueTimestepEmbedder,
}


def apply(model: nn.Module, enabled: bool = True, attention: str = "sdpa") -> nn.Module:
    """Switch ``model``'s speed paths on (``enabled``) or back off, in place; ``attention`` is the kernel backend
    (``sdpa`` or ``xformers``, the recipe's ``model.attention``). Returns ``model``."""
    plain = {fast: slow for slow, fast in TWINS.items()}
    for m in model.modules():
        swap = TWINS if enabled else plain
        if type(m) in swap:
            m.__class__ = swap[type(m)]
    replace_dropout(model, enabled)
    if enabled or attention != "sdpa":
        set_attention_backend(model, attention, cpu_kernels=enabled)
    else:  # timm's own attention module: SDPA as it calls it
        for m in model.modules():
            if type(m) is FastAttention:
                m.__class__ = Attention
    return model
