"""Throughput, MFU and the metrics log (metrics.jsonl plus wandb)."""

import json
import pathlib
import secrets


class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors it to wandb.

    Only process 0 writes; other processes get a disabled log. The wandb run id is kept in the run
    folder (`wandb_id`), so a restarted run continues the same wandb run instead of opening a new one.
    """

    def __init__(self, run_dir: pathlib.Path, config: dict, *, wandb_mode: str, project: str, enabled: bool):
        self.enabled = enabled
        self.path = pathlib.Path(run_dir) / "metrics.jsonl"
        self.wandb = None
        if enabled and wandb_mode != "disabled":
            import wandb

            id_file = pathlib.Path(run_dir) / "wandb_id"
            if not id_file.exists():
                id_file.write_text(secrets.token_hex(6))  # wandb ids are short lowercase alphanumerics
            self.wandb = wandb.init(
                id=id_file.read_text().strip(),
                project=project,
                dir=str(run_dir),
                config=config,
                mode=wandb_mode,
                name=pathlib.Path(run_dir).name,
                resume="allow",
                settings=wandb.Settings(silent=True, console="off"),
            )

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after `step`: those steps are about to be redone. The caller
        passes the newest step that still exists in any form (a set-aside one included), so no row of
        a step that could still be recovered is ever cut; after a fallback to an earlier checkpoint
        the redone steps are logged again, and the later row of a step is the one that counts."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(self.path)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
