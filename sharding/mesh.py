"""Build the device mesh from the recipe: axes (data, fsdp, context, tensor, expert), -1 fills, multi-slice DCN axes;
and the Layout, the mesh with its logical-axis rules, that every sharded computation runs under."""

import contextlib
import dataclasses
import math

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, AxisType, Mesh

from lm.errors import UserError
from sharding.rules import MeshAxes, logical_rules

# context: the sequence split (context parallelism); expert: an MoE layer's experts split (expert
# parallelism). The order is MaxText's: the axes that talk most are innermost, nearest neighbours.
AXES = ("data", "fsdp", "context", "tensor", "expert")


def resolve_shape(
    data: int, fsdp: int, tensor: int, n_devices: int, context: int = 1, expert: int = 1
) -> tuple[int, ...]:
    """Fill the one -1 axis so that the product of the axes (in AXES order) == n_devices, or explain
    why it can't."""
    shape = [data, fsdp, context, tensor, expert]
    if sum(s == -1 for s in shape) > 1:
        raise UserError(f"mesh {dict(zip(AXES, shape))}: at most one of mesh.data/fsdp/context/tensor/expert may be -1")
    if any(s == 0 or s < -1 for s in shape):
        raise UserError(f"mesh {dict(zip(AXES, shape))}: sizes must be positive or -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n_devices % known:
            raise UserError(
                f"mesh {dict(zip(AXES, shape))}: the fixed axes ({known}) do not divide the {n_devices} devices"
            )
        shape[shape.index(-1)] = n_devices // known
    if math.prod(shape) != n_devices:
        raise UserError(
            f"mesh data*fsdp*context*tensor*expert = {'*'.join(map(str, shape))} = {math.prod(shape)} but there are "
            f"{n_devices} devices; set one of mesh.data/fsdp/context/tensor/expert to -1 to fill"
        )
    return tuple(shape)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """A Mesh over all devices (or `devices`), with Auto axes: GSPMD propagation. (jax 0.10 defaults to
    Explicit axes, where the embedding gather fails with a ShardingTypeError.)"""
    grid = device_grid(mesh_cfg, list(jax.devices() if devices is None else devices))
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def device_grid(mesh_cfg, devices: list) -> np.ndarray:
    """Devices arranged [data, fsdp, context, tensor, expert]. With dcn_data/dcn_fsdp > 1 they are grouped
    by slice (`device.slice_index`): the ICI part of each axis stays inside a slice, and only the DCN part
    (the outer factor of data or fsdp) spans slices over the data-centre network."""
    dcn = (mesh_cfg.dcn_data, mesh_cfg.dcn_fsdp, 1, 1, 1)
    n_slices = math.prod(dcn)
    if len(devices) % n_slices:
        raise UserError(f"{len(devices)} devices cannot form mesh.dcn_data*dcn_fsdp={n_slices} slices")
    m = mesh_cfg
    ici = resolve_shape(m.data, m.fsdp, m.tensor, len(devices) // n_slices, m.context, m.expert)
    if n_slices > 1:
        found = len({getattr(d, "slice_index", 0) for d in devices})
        if found != n_slices:
            raise UserError(
                f"mesh.dcn_data*dcn_fsdp={n_slices} slices requested but the devices come from {found}; "
                "set them to the number of slices in the job"
            )
        return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    try:
        return mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        return np.array(devices).reshape(ici)  # CPU and unusual topologies: plain order


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh and the logical-axis rules that map names onto it, travelling as one.

    `with layout:` enters both (`jax.set_mesh` and `nnx.logical_axis_rules`): what an entry point
    does once around everything that builds, shards or runs arrays. The mesh may be an AbstractMesh
    (the planner's, for hardware that is not here); then entering it only sets the abstract mesh.
    """

    mesh: Mesh | AbstractMesh
    rules: tuple[tuple[str, MeshAxes], ...] = dataclasses.field(default_factory=logical_rules)
    _entered: list = dataclasses.field(default_factory=list, init=False, repr=False, compare=False)

    @classmethod
    def build(cls, mesh_cfg, devices=None) -> "Layout":
        """The recipe's mesh (its MeshConfig) over all devices or `devices`, with its rule overrides."""
        return cls(make_mesh(mesh_cfg, devices), logical_rules(mesh_cfg.rules))

    @property
    def shape(self) -> dict[str, int]:
        return dict(self.mesh.shape)

    @property
    def batch_devices(self) -> int:
        """How many ways the batch is split (data x fsdp x expert: expert-parallel devices hold different
        tokens outside the MoE layers)."""
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"] * self.mesh.shape["expert"]

    def __enter__(self) -> "Layout":
        stack = contextlib.ExitStack()
        if isinstance(self.mesh, AbstractMesh):
            stack.enter_context(jax.sharding.use_abstract_mesh(self.mesh))
        else:
            stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nnx.logical_axis_rules(self.rules))
        self._entered.append(stack)
        return self

    def __exit__(self, *exc) -> None:
        self._entered.pop().close()
