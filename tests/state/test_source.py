"""init.from is read once, by the launcher: load_recipe never touches a checkpoint, and the source's
model meets the run's execution options (loss_chunk and max_segments included)."""

import pytest

from lm.config import load_recipe
from lm.errors import UserError
from lm.state.source import resolve_init

pytest.importorskip("transformers")
from hf_models import save_hf_checkpoint  # noqa: E402 (after the importorskip)


def test_load_recipe_reads_no_checkpoint(tmp_path):
    recipe = load_recipe("finetune_tiny", [f"init.from={tmp_path / 'nowhere'}"])  # no such folder: not read here
    assert recipe.init.from_.endswith("nowhere")
    with pytest.raises(UserError, match="does not exist"):
        resolve_init(recipe)


def test_init_from_takes_execution_overrides_and_refuses_architecture_ones(tmp_path):
    save_hf_checkpoint("llama", tmp_path)
    sets = [f"init.from={tmp_path}", "model.loss_chunk=16", "model.max_segments=4", "model.remat=full"]
    recipe, source = resolve_init(load_recipe("finetune_tiny", sets), sets)
    assert source.hf and source.tokenizer is None and source.model.n_layers == recipe.model.n_layers
    assert (recipe.model.loss_chunk, recipe.model.max_segments, recipe.model.remat) == (16, 4, "full")
    assert recipe.model.d_model == source.model.d_model != load_recipe("finetune_tiny").model.d_model
    sets.append("model.n_layers=7")
    with pytest.raises(UserError, match="model.n_layers=7 conflicts with init.from"):
        resolve_init(load_recipe("finetune_tiny", sets), sets)
