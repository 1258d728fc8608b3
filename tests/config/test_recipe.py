"""Recipes: typed overrides, near-match errors, JSON round trip, resume compatibility."""

import pytest

from lm.config import Recipe, all_keys, apply_overrides, diff_recipes, load_recipe
from lm.errors import UserError


def test_overrides_are_typed_and_order_free():
    r = load_recipe(
        "stdlib_tiny",
        [
            "model.n_heads=8",
            "model.n_kv_heads=8",
            "train.steps=7",
            "optimizer.lr=1e-3",
            "checkpoint.keep_period=none",
            "model.scan_layers=false",
            'data.inputs=["a","b"]',
        ],
    )
    assert (r.model.n_heads, r.model.n_kv_heads, r.train.steps) == (8, 8, 7)
    assert r.optimizer.lr == 1e-3 and r.model.scan_layers is False and r.data.inputs == ("a", "b")
    # n_kv_heads=8 before n_heads=8 would be invalid on its own; overrides are validated together.
    assert load_recipe("stdlib_tiny", ["model.n_kv_heads=8", "model.n_heads=8"]).model.n_kv_heads == 8


def test_unknown_key_lists_near_matches():
    with pytest.raises(UserError, match=r"unknown recipe key 'train.stepz'.*train\.steps"):
        load_recipe("stdlib_tiny", ["train.stepz=3"])


@pytest.mark.parametrize(
    "item, message",
    [
        ("train.steps=abc", "expects int"),
        ("model.scan_layers=maybe", "true or false"),
        ("logging.wandb=loud", "not one of"),
        ("train.steps", "key.path=value"),
        ("model.n_kv_heads=3", "not divisible"),
        ("train.seq_len=100000", "max_seq_len"),
    ],
)
def test_bad_values_are_one_line_user_errors(item, message):
    with pytest.raises(UserError, match=message) as e:
        load_recipe("stdlib_tiny", [item])
    assert "\n" not in str(e.value)


def test_unknown_recipe_and_missing_file():
    with pytest.raises(UserError, match="unknown recipe"):
        load_recipe("no_such_recipe")
    with pytest.raises(UserError, match="does not exist"):
        load_recipe("/nonexistent/recipe.py")


def test_json_round_trip_and_every_key_settable():
    r = load_recipe("stdlib_tiny")
    assert Recipe.from_dict(r.to_dict()) == r
    assert "model.n_kv_heads" in all_keys() and "mesh.fsdp" in all_keys()


def test_resume_diff_separates_safe_from_conflicting():
    a = load_recipe("stdlib_tiny")
    safe, conflicts = diff_recipes(a, apply_overrides(a, ["train.steps=900", "mesh.fsdp=2"]))
    assert len(safe) == 2 and not conflicts
    safe, conflicts = diff_recipes(a, apply_overrides(a, ["model.d_model=256"]))
    assert conflicts == ["model.d_model: 128 -> 256"]
