"""report.trackers: TensorBoard, MLflow and W&B runs read back with their own clients, against metrics.jsonl.

One 2-rank run (module fixture) that fails after a checkpoint (its parameters turn non-finite at step 7, an error
that ends the processes normally) and is resumed from step 4: the trackers must hold every
train/eval value of metrics.jsonl at its step (the resumed process's value where a step was logged twice), the
config as parameters, the summary and the reports, in ONE tracker run continued across the resume.
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

import runner
from dist_finetune.config import ConfigError
from dist_finetune import trackers

pytestmark = pytest.mark.slow

OVERRIDES = ["train.max_steps=12", "eval.every_steps=4", "checkpoint.every_steps=4", "report.plots=true",
             "report.tensorboard=true", "report.trackers=[mlflow, wandb]", "report.experiment=tracker-test"]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> runner.Run:
    tmp = tmp_path_factory.mktemp("trackers")
    failed = runner.train(tmp, "run", OVERRIDES, nproc=2, env={"DIST_FINETUNE_FAULTS": "nan_param@step=7"})
    assert not failed.ok and (failed.dir / "checkpoints" / "step_0000004").is_dir(), failed.output()
    assert "became non-finite at step 7" in failed.proc.stderr, failed.output()
    assert {e["step"] for e in failed.events("train")} >= {5, 6}  # logged, then replayed by the resume
    run = runner.train(tmp, "run", [*OVERRIDES, "resume=auto"], nproc=2)
    assert run.ok, run.output()
    assert "resumed from step_0000004" in run.proc.stdout
    return run


def expected(run: runner.Run) -> dict[str, dict[int, float]]:
    """metrics.jsonl's train/eval numbers as tracker metrics: {name: {step: value}}."""
    out: dict[str, dict[int, float]] = {}
    for kind in ("train", "eval"):
        for event in run.events(kind):
            for key, value in trackers.numbers(event).items():
                if key != "time":
                    out.setdefault(trackers.metric_name(kind, key), {})[event["step"]] = value
    return out


def assert_matches(logged: dict[str, dict[int, float]], run: runner.Run) -> None:
    want = expected(run)
    assert {"train/train_loss", "eval/val_loss", "eval/val_accuracy", "train/lr"} <= set(want)
    for name, by_step in want.items():
        assert logged.get(name) == pytest.approx(by_step, rel=1e-6), name


def last_by_step(points) -> dict[int, float]:
    """(order, step, value) -> the value logged last for each step (a resumed run logs some steps again)."""
    out: dict[int, float] = {}
    for _, step, value in sorted(points, key=lambda p: p[0]):
        out[step] = value
    return out


def test_mlflow_run_holds_metrics_params_summary_and_reports(resumed):
    ids = json.loads((resumed.dir / "trackers.json").read_text())["mlflow"]
    uri = f"sqlite:///{resumed.dir / 'mlruns' / 'mlflow.db'}"
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    mlflow.set_tracking_uri(uri)
    found = mlflow.search_runs(experiment_names=["tracker-test"], output_format="list")
    assert [r.info.run_id for r in found] == [ids["run_id"]]  # the resume continued the same run
    info = found[0]
    assert info.info.status == "FINISHED" and info.info.run_name == "run"
    logged = {name: last_by_step((m.timestamp, m.step, m.value) for m in client.get_metric_history(
        ids["run_id"], name)) for name in info.data.metrics if not name.startswith("summary/")}
    assert_matches(logged, resumed)
    summary = resumed.summary()
    assert info.data.metrics["summary/test/accuracy"] == pytest.approx(summary["test"]["accuracy"])
    assert info.data.metrics["summary/best_step"] == summary["best_step"]
    assert info.data.params["train.max_steps"] == "12" and info.data.params["report.trackers"] == '["mlflow", "wandb"]'
    artifacts = {a.path for a in client.list_artifacts(ids["run_id"])}
    assert {"report.md", "summary.json", "loss.png", "confusion_test.png"} <= artifacts
    local = Path(client.download_artifacts(ids["run_id"], "summary.json", str(resumed.dir.parent)))
    assert json.loads(local.read_text()) == summary


def wandb_records(path: Path):
    """The protobuf records of a W&B transaction log (`run-ID.wandb`): a LevelDB-style log of 32 KiB blocks,
    after a 7-byte header; each chunk is crc32 (4) + length (2) + type (1: full, 2: first, 3: middle, 4: last)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending = path.read_bytes(), 32 * 1024, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_holds_metrics_config_summary_and_reports(resumed):
    run_id = json.loads((resumed.dir / "trackers.json").read_text())["wandb"]["id"]
    folders = sorted((resumed.dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(f"-{run_id}") for f in folders)  # one run, resumed
    points, config, order = [], {}, 0
    for folder in folders:
        for record in wandb_records(folder / f"run-{run_id}.wandb"):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
                step = items.pop("_step")
                for name, value in items.items():
                    if isinstance(value, (int, float)) and not name.startswith("_"):
                        order += 1
                        points.append((name, (order, step, value)))
            elif kind in ("run", "config"):  # the config given to wandb.init, then any update
                items = record.run.config.update if kind == "run" else record.config.update
                config.update({i.key: json.loads(i.value_json) for i in items})
    logged: dict[str, list] = {}
    for name, point in points:
        logged.setdefault(name, []).append(point)
    assert_matches({n: last_by_step(p) for n, p in logged.items() if not n.startswith("summary/")}, resumed)
    summary = resumed.summary()
    assert last_by_step(logged["summary/test/accuracy"]) == {12: pytest.approx(summary["test"]["accuracy"])}
    assert config["train"]["max_steps"] == 12 and config["report"]["experiment"] == "tracker-test"
    files = folders[-1] / "files"
    assert json.loads((files / "summary.json").read_text()) == summary
    assert (files / "report.md").read_text() == (resumed.dir / "report.md").read_text()


def test_tensorboard_kept_working_through_report_tensorboard(resumed):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged: dict[str, list] = {}
    for path in sorted((resumed.dir / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            logged.setdefault(tag, []).extend((e.wall_time, e.step, e.value) for e in acc.Scalars(tag))
    assert_matches_fp32 = {n: last_by_step(p) for n, p in logged.items() if not n.startswith("summary/")}
    want = expected(resumed)
    for name, by_step in want.items():  # TensorBoard stores float32
        assert assert_matches_fp32[name] == pytest.approx(by_step, rel=1e-5), name


def test_the_run_folder_with_tracker_files_is_replaceable_by_overwrite(resumed):
    from dist_finetune import runs

    names = sorted(p.name for p in resumed.dir.iterdir())
    assert {"mlruns", "wandb", "trackers.json", "tensorboard"} <= set(names)
    assert runs.foreign_files(resumed.dir, names) == []
    # a user's file anywhere inside the trackers' folders is theirs: --overwrite must refuse the folder
    run_folder = next((resumed.dir / "wandb").glob("offline-run-*"))
    notes = [resumed.dir / "mlruns" / "artifacts" / "notes.txt", run_folder / "files" / "notes.txt",
             resumed.dir / "wandb" / "run-20240101_000000-My_Run-1" / "precious.txt"]
    for path in notes:
        path.parent.mkdir(exist_ok=True)
        path.write_text("mine")
        try:
            rel = path.relative_to(resumed.dir).as_posix()
            assert runs.foreign_files(resumed.dir, names) == [rel], rel
        finally:
            path.unlink()
    (resumed.dir / "wandb" / "run-20240101_000000-My_Run-1").rmdir()  # W&B ids may hold capitals, _ and -
    assert runs.foreign_files(resumed.dir, names) == []


def test_a_moved_run_folder_keeps_its_artifacts_in_its_own_store(resumed, tmp_path):
    import shutil
    import sqlite3

    moved = tmp_path / "moved"
    shutil.copytree(resumed.dir, moved, symlinks=True)
    trackers.repoint_moved_store(moved / "mlruns")
    with sqlite3.connect(moved / "mlruns" / "mlflow.db") as db:
        locations = [row[0] for row in db.execute("SELECT artifact_location FROM experiments WHERE name = ?",
                                                  ("tracker-test",))]
        uris = [row[0] for row in db.execute("SELECT artifact_uri FROM runs")]
    assert locations == [(moved / "mlruns" / "artifacts").as_uri()]
    assert uris and all(uri.startswith((moved / "mlruns" / "artifacts").as_uri() + "/") for uri in uris)
    run_id = json.loads((moved / "trackers.json").read_text())["mlflow"]["run_id"]
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{moved / 'mlruns' / 'mlflow.db'}")
    assert {a.path for a in client.list_artifacts(run_id)} >= {"report.md", "summary.json"}  # found where it is


def test_damaged_tracker_ids_are_dropped_not_fatal(tmp_path):
    (tmp_path / "trackers.json").write_text(json.dumps({"mlflow": "oops", "wandb": {"id": ["x"]},
                                                        "tensorboard": {}, "comet": {"id": "x"}}))
    assert trackers.read_ids(tmp_path) == {"tensorboard": {}}
    (tmp_path / "trackers.json").write_text("[1, 2]")
    assert trackers.read_ids(tmp_path) == {}


def test_a_tracker_that_is_not_installed_is_one_line_before_the_run_folder(tmp_path):
    config = runner.write_config(tmp_path / "c.yaml")
    code = ("import sys; sys.modules['wandb'] = None; from dist_finetune.train import main; "
            "sys.argv = ['train', '--config', sys.argv[1], sys.argv[2], 'report.trackers=[wandb]']; sys.exit(main())")
    proc = subprocess.run([sys.executable, "-c", code, str(config), f"output_dir={tmp_path / 'run'}"],
                          cwd=runner.REPO, env=runner.child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "report.trackers: wandb needs the optional extra 'wandb'" in lines[0]
    assert "pip install 'dist-finetune[wandb]'" in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_tracker_that_cannot_open_its_run_stops_before_training(tmp_path):
    port = runner.free_port()  # nothing listens there
    run = runner.train(tmp_path, "run", ["report.trackers=[mlflow]", "train.max_steps=2"], env={
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}, timeout=120)
    assert run.proc.returncode == 2, run.output()
    assert "report.trackers: could not open the mlflow run" in run.proc.stderr
    assert not list(run.dir.glob("checkpoints/step_*"))


def test_tracker_names_are_checked_in_the_config():
    from dist_finetune.config import from_dict

    assert from_dict({"report": {"trackers": "mlflow", "tensorboard": True}}).report.tracker_names == (
        "mlflow", "tensorboard")
    with pytest.raises(ConfigError, match=r"report.trackers: \['comet'\] is not allowed; choose a list of: "
                                          r"tensorboard \| mlflow \| wandb"):
        from_dict({"report": {"trackers": ["comet"]}})
