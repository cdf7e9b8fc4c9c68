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
from dataclasses import dataclass
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
        self.client = MlflowClient(tracking_uri=server or f"sqlite:///{local / 'mlflow.db'}")
        store = server or "RUN/mlruns"  # a run folder moved elsewhere keeps its local store
        saved = info.saved.get(self.name) or {}
        self.run_id = saved.get("run_id") if saved.get("store") == store else None
        if self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = info.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(
                experiment, artifact_location=None if server else (local / "artifacts").as_uri())
            self.run_id = self.client.create_run(experiment_id, run_name=info.run_name).info.run_id
            params = [Param(k, v[:6000]) for k, v in flat_params(info.config).items()]
            for start in range(0, len(params), 100):  # the store's batch limit
                self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.ids = {"run_id": self.run_id, "store": store}

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


class WandbTracker:
    """Offline (files under RUN/wandb, `wandb sync` uploads them) unless WANDB_MODE says otherwise."""

    name = "wandb"

    def __init__(self, info: RunInfo) -> None:
        import wandb

        saved = info.saved.get(self.name) or {}
        project = info.experiment or os.environ.get("WANDB_PROJECT") or DEFAULT_EXPERIMENT
        self.run = wandb.init(
            project=project, name=info.run_name, dir=str(info.run_dir), config=info.config,
            id=saved.get("id"), resume="allow" if saved.get("id") else None,
            mode=None if os.environ.get("WANDB_MODE") else "offline",
            settings=wandb.Settings(console="off", silent=True))
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
    path = run_dir / IDS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return {}  # a damaged file only costs continuity: the trackers start new runs
    return data if isinstance(data, dict) else {}


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
    if ids:
        files.atomic_write_text(info.run_dir / IDS_FILE, json.dumps({**info.saved, **ids}, indent=2) + "\n")
    return opened
