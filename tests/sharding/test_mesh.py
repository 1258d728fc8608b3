"""Mesh construction: -1 fills, clear errors, and multi-slice (DCN) layouts."""

import dataclasses

import pytest

from lm.config import MeshConfig
from lm.errors import UserError
from sharding.mesh import device_grid, resolve_shape
from sharding.rules import logical_rules, logical_to_spec


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """What mesh_utils reads of a TPU device in a multi-slice job."""

    id: int
    slice_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"
    process_index: int = 0


def test_minus_one_fills_and_bad_shapes_explain_themselves():
    assert resolve_shape(2, -1, 2, 16) == (2, 4, 1, 2, 1)  # (data, fsdp, context, tensor, expert)
    assert resolve_shape(1, 1, -1, 8) == (1, 1, 1, 8, 1)
    assert resolve_shape(1, 2, 1, 8, context=-1) == (1, 2, 4, 1, 1)
    assert resolve_shape(1, 2, 1, 8, expert=-1) == (1, 2, 1, 1, 4)
    with pytest.raises(UserError, match="at most one"):
        resolve_shape(-1, -1, 1, 8)
    with pytest.raises(UserError, match="do not divide the 8 devices"):
        resolve_shape(3, -1, 1, 8)
    with pytest.raises(UserError, match=r"2\*2\*1\*1\*1 = 4 but there are 8 devices"):
        resolve_shape(2, 2, 1, 8)


@pytest.mark.parametrize("dcn", [(2, 1), (1, 2), (4, 1)])
def test_multislice_only_the_dcn_factor_crosses_slices(dcn):
    n_slices = dcn[0] * dcn[1]
    devices = [FakeDevice(i, i // 4) for i in range(4 * n_slices)]
    cfg = MeshConfig(data=1, fsdp=-1, tensor=1, dcn_data=dcn[0], dcn_fsdp=dcn[1])
    grid = device_grid(cfg, devices)
    assert grid.shape == (dcn[0], 4 * dcn[1], 1, 1, 1)
    # Within one slice-sized block of the fsdp axis, every device is on the same slice.
    for d in range(grid.shape[0]):
        for block in range(dcn[1]):
            slices = {dev.slice_index for dev in grid[d, block * 4 : (block + 1) * 4, 0, 0, 0]}
            assert len(slices) == 1
    assert len({dev.slice_index for dev in grid.ravel()}) == n_slices


def test_multislice_count_must_match_the_devices():
    devices = [FakeDevice(i, i // 4) for i in range(8)]
    with pytest.raises(UserError, match="from 2"):
        device_grid(MeshConfig(dcn_data=4, fsdp=-1), devices)


def test_rules_table_overrides_and_one_axis_per_dimension():
    rules = logical_rules([("vocab", None), ("mlp", ["fsdp", "tensor"])])
    assert logical_to_spec(("embed", "vocab"), rules) == logical_to_spec(("embed", None), rules)
    assert tuple(logical_to_spec(("embed", "mlp"), rules)) == ("fsdp", "tensor")  # fsdp already taken by embed
    assert tuple(logical_to_spec(("batch", "length", "embed"))) == (None, None, None)  # no rules in context
    assert tuple(logical_to_spec(("batch", "length", "embed"), logical_rules())) == (
        ("data", "fsdp", "expert"),
        "context",
        None,
    )
