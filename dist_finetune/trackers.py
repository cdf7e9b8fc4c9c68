"""Experiment trackers: TensorBoard, MLflow and Weights & Biases, fed by rank 0's reporter.

Each tracker gets the resolved config as parameters, every train/eval event as metrics at its step, the summary as
final metrics and the run's reports as artifacts. Which tracker run belongs to a run folder is kept in
RUN/trackers.json, so a resumed run logs into the run it started. A tracker that fails while training is warned about
once and dropped: losing a dashboard must not lose the training run.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import contextlib
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from . import files, logs
from .config import ConfigError
from .errors import UserError
# tracker -> (module that must import, the package's extra that installs it); one entry per name in config.TRACKERS
EXTRAS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}
IDS_FILE = "trackers.json"
DEFAULT_EXPERIMENT = "dist_finetune"


def check_installed(names: tuple[str, ...]) -> None:
    """Before anything starts: a tracker asked for but not installed is one line naming its extra."""
    for name in names:
        module, extra = EXTRAS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"report.trackers: {name} needs the optional extra '{extra}', which is not installed; "
                              f"pip install 'dist-finetune[{extra}]' (or remove {name} from report.trackers)")


def metric_name(kind: str, key: str) -> str:
    """`train` + `train_loss` -> `train/train_loss`: the same tag in every tracker."""
    return f"{kind}/{key}"


def numbers(values: dict[str, Any], skip: tuple[str, ...] = ("step",)) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in skip}


def flat_summary(summary: dict[str, Any], prefix: str = "summary") -> dict[str, float]:
    """Scalars of the summary, nested splits included: `summary/test/accuracy`, `summary/test/macro/f1`."""
    out: dict[str, float] = {}
    for key, value in summary.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            out.update(flat_summary(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


class Tracker(Protocol):
    name: str

    def metrics(self, values: dict[str, float], step: int) -> None: ...

    def artifacts(self, paths: list[Path]) -> None: ...

    def close(self, status: str) -> None: ...


@dataclass
class RunInfo:
    """What every tracker needs to open its run."""

    run_dir: Path
    run_name: str
    experiment: str | None
    config: dict[str, Any]
    saved: dict[str, Any]  # trackers.json of this run folder: {} for a new run
    warnings: list[str] = field(default_factory=list)  # for the reporter to show once the trackers are open


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, info: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(info.run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(info.config, indent=2) + "\n```")
        self.ids: dict[str, Any] = {}

    def metrics(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def artifacts(self, paths: list[Path]) -> None:
        for path in paths:
            if path.suffix == ".md":
                self.writer.add_text(path.name, path.read_text(encoding="utf-8"))
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class MLflowTracker:
    """MLFLOW_TRACKING_URI when set, else a SQLite store in RUN/mlruns (`mlflow ui --backend-store-uri ...`)."""

    name = "mlflow"

    def __init__(self, info: RunInfo) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        logs.route_library("mlflow")  # its INFO lines (creating the store) go to the run's log file
        logs.route_library("alembic")
        server = os.environ.get("MLFLOW_TRACKING_URI")
        local = (info.run_dir / "mlruns").resolve()
        if not server:
            local.mkdir(parents=True, exist_ok=True)
            repoint_moved_store(local)
        self.client = MlflowClient(tracking_uri=server or f"sqlite:///{local / 'mlflow.db'}")
        store = server or "RUN/mlruns"  # a run folder moved elsewhere keeps its local store
        saved = info.saved.get(self.name) or {}
        self.run_id = self._continued(saved.get("run_id"), info) if saved.get("store") == store else None
        if self.run_id is None:
            experiment = info.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(
                experiment, artifact_location=None if server else (local / "artifacts").as_uri())
            self.run_id = self.client.create_run(experiment_id, run_name=info.run_name).info.run_id
            params = [Param(k, v[:6000]) for k, v in flat_params(info.config).items()]
            for start in range(0, len(params), 100):  # the store's batch limit
                self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.ids = {"run_id": self.run_id, "store": store}

    def _continued(self, run_id: str | None, info: RunInfo) -> str | None:
        """The run trackers.json names, running again; None (a new run, with a warning) if the store lacks it."""
        from mlflow.exceptions import MlflowException

        if run_id is None:
            return None
        try:
            self.client.get_run(run_id)
        except MlflowException:
            info.warnings.append(f"{info.run_dir / IDS_FILE}: MLflow run {run_id} is not in the store; logging to "
                                 "a new run")
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = _millis()
        batch = [Metric(_mlflow_key(k), v, now, step) for k, v in values.items()]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start:start + 1000])

    def artifacts(self, paths: list[Path]) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status={"finished": "FINISHED", "failed": "FAILED",
                                                        "stopped": "KILLED"}[status])


def repoint_moved_store(local: Path) -> None:
    """A run folder that was moved or copied: its SQLite store still names the old folder's artifact paths, where
    new artifacts would land (in another run, or a folder made again). Point them at this folder's."""
    database = local / "mlflow.db"
    if not database.is_file():
        return
    here = (local / "artifacts").as_uri()
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        for (old,) in db.execute("SELECT DISTINCT artifact_location FROM experiments").fetchall():
            if old and old != here and old.startswith("file://") and old.endswith("/mlruns/artifacts"):
                db.execute("UPDATE experiments SET artifact_location = ? WHERE artifact_location = ?", (here, old))
                db.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) WHERE artifact_uri LIKE ?",
                           (here, len(old) + 1, old + "/%"))


class WandbTracker:
    """Offline (files under RUN/wandb, `wandb sync` uploads them) unless WANDB_MODE says otherwise."""

    name = "wandb"

    def __init__(self, info: RunInfo) -> None:
        import wandb

        saved = info.saved.get(self.name) or {}
        project = info.experiment or os.environ.get("WANDB_PROJECT") or DEFAULT_EXPERIMENT
        settings = dict(project=project, name=info.run_name, dir=str(info.run_dir), config=info.config,
                        mode=None if os.environ.get("WANDB_MODE") else "offline",
                        settings=wandb.Settings(console="off", silent=True, init_timeout=60))
        try:
            self.run = wandb.init(id=saved.get("id"), resume="allow" if saved.get("id") else None, **settings)
        except wandb.errors.UsageError:
            if not saved.get("id"):
                raise
            info.warnings.append(f"{info.run_dir / IDS_FILE}: W&B refused run id {saved['id']!r}; logging to a new run")
            self.run = wandb.init(**settings)
        self.ids = {"id": self.run.id, "project": project}

    def metrics(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def artifacts(self, paths: list[Path]) -> None:
        for path in paths:  # W&B uploads what its run folder's files/ holds (wandb sync, for offline runs)
            shutil.copyfile(path, Path(self.run.dir) / path.name)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)


OPENERS: dict[str, Callable[[RunInfo], Any]] = {
    "tensorboard": TensorBoardTracker, "mlflow": MLflowTracker, "wandb": WandbTracker}


def _millis() -> int:
    import time

    return int(time.time() * 1000)


def _mlflow_key(key: str) -> str:
    """MLflow allows letters, digits and `_-. /` in metric names: anything else becomes `_`."""
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in key)


def read_ids(run_dir: Path) -> dict[str, Any]:
    """trackers.json's entries that look right ({tracker: {key: string}}); a damaged file or entry only costs
    continuity: those trackers start new runs."""
    path = run_dir / IDS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {name: entry for name, entry in data.items()
            if name in OPENERS and isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())}


def open_trackers(names: tuple[str, ...], info: RunInfo) -> list[Any]:
    """Opens each tracker; a failure is a UserError naming the tracker (rank 0 hands it to every rank)."""
    opened = []
    for name in names:
        try:
            opened.append(OPENERS[name](info))
        except UserError:
            raise
        except Exception as exc:  # a server that does not answer, a store we cannot write
            for tracker in opened:
                tracker.close("failed")
            raise ConfigError(f"report.trackers: could not open the {name} run ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else 'no message'}); fix it or remove "
                              f"{name} from report.trackers") from None
    ids = {t.name: t.ids for t in opened if t.ids}
    try:
        if ids:
            files.atomic_write_text(info.run_dir / IDS_FILE, json.dumps({**info.saved, **ids}, indent=2) + "\n")
    except OSError as exc:
        for tracker in opened:
            tracker.close("failed")
        raise ConfigError(f"report.trackers: cannot write {info.run_dir / IDS_FILE} ({exc.strerror or exc}); free "
                          "the disk or fix the folder, or remove report.trackers") from None
    return opened
