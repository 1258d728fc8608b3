"""ModelConfig's derived numbers and its one list of execution options."""

import dataclasses

from lm.config import EXECUTION, SAFE_TO_CHANGE, STORED, ModelConfig, preset


def test_maxtext_flops_count_every_gated_mlp_as_three_matmuls():
    """GeGLU (Gemma) has gate, up and down like SwiGLU; only plain GELU (GPT-2) has two. The MaxText
    convention once tested `mlp == "swiglu"`, which undercounted Gemma."""
    swiglu = preset("gemma_2b", mlp="swiglu")
    geglu, gelu = preset("gemma_2b"), preset("gemma_2b", mlp="gelu")
    d, f, layers, seq = geglu.d_model, geglu.d_ff, geglu.n_layers, 4096
    assert geglu.flops_per_token(seq, "maxtext") == swiglu.flops_per_token(seq, "maxtext")
    assert geglu.flops_per_token(seq, "maxtext") - gelu.flops_per_token(seq, "maxtext") == 6 * layers * d * f


def test_execution_options_are_one_list_that_resume_and_sources_share():
    cfg = ModelConfig()
    assert set(cfg.execution()) == set(EXECUTION) and {"loss_chunk", "max_segments"} <= set(EXECUTION)
    theirs = ModelConfig(n_layers=3, loss_chunk=0, remat="full")
    mine = dataclasses.replace(cfg, loss_chunk=64, max_segments=4, remat="dots")
    merged = theirs.with_execution_of(mine)
    assert merged.n_layers == 3 and merged.execution() == mine.execution()
    for key in EXECUTION:  # what a resumed run may change: every execution option but the stored layout
        assert (f"model.{key}" in SAFE_TO_CHANGE) == (key not in STORED), key
