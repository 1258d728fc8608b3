"""The planner: per-device memory, fit and step time of a recipe on a topology, before anything runs."""

from lm.plan.planner import REMATS, Plan, estimate, plan_mesh
