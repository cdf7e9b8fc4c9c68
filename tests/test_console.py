"""What a user sees while a run trains: the evaluation and early-stop lines, the final line, the progress
bar, the console kept to our own lines (DeepSpeed's go to RUN/logs/), `--help`, the confusion plot."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import runner
from dist_finetune import report, runs
from dist_finetune.report import Reporter
from dist_finetune.train import parse_args

FAULTS = "DIST_FINETUNE_FAULTS"
STEPS = ["train.max_steps=12", "eval.every_steps=4"]
DEEPSPEED_INFO = "DeepSpeedEngine configuration"  # one of DeepSpeed's INFO records, on every run


def last_bar(stderr: str) -> str:
    """The bar as it was last drawn (tqdm redraws it in place with carriage returns)."""
    return [line for line in re.split(r"[\r\n]", stderr) if line.startswith("train:")][-1]


def rank_log(run: Path, rank: int = 0) -> str:
    return (run / "logs" / f"train_rank{rank}.log").read_text()


# ---------------------------------------------------------------- one process: lines, bar, log file


def test_an_early_stop_says_each_evaluation_the_reason_and_where_the_model_is(tmp_path):
    """min_delta 10: the first evaluation is the best, the next one stops the run (patience 1)."""
    run = runner.train(tmp_path, "early", ["train.max_steps=12", "eval.every_steps=2", "early_stopping.patience=1",
                                           "early_stopping.min_delta=10", "report.progress_bar=off"])
    assert run.ok, run.output()
    out = run.proc.stdout
    assert "plan: up to 12 steps" in out
    assert re.search(r"^eval step 2: val_loss \d\.\d{4} val_accuracy \d\.\d{4} \(new best\)$", out, re.M), out
    assert re.search(r"^eval step 4: val_loss \d\.\d{4} val_accuracy \d\.\d{4}$", out, re.M), out
    assert re.search(r"^early stop at step 4: no improvement in val_loss by more than 10 for 1 evaluation "
                     r"\(best \d\.\d{4} at step 2\)$", out, re.M), out
    best, export = run.dir / "checkpoints" / "step_0000002", run.dir / "export"
    assert f"stopped early at step 4 of 12; best checkpoint: {best}; exported model: {export}\n" in out
    assert best.is_dir() and (export / "model.safetensors").is_file()
    last = out.strip().splitlines()[-1]
    assert last.startswith("done: test accuracy ") and "best step 2," in last and str(run.dir) in last
    assert not re.search(r"\bstep \d+/12\b", run.proc.stderr)  # no bar: log lines go to stdout only

    console = out + run.proc.stderr
    assert DEEPSPEED_INFO not in console and "INFO " not in console, console[-3000:]
    log = rank_log(run.dir)
    assert DEEPSPEED_INFO in log and "torch.distributed" in log  # the libraries' records, at INFO
    assert "early stop at step 4" in log and "done: test accuracy" in log  # and our own lines, in order
    assert log.index("DeepSpeedEngine") < log.index("eval step 2") < log.index("done:")
    names = sorted(p.name for p in run.dir.iterdir())
    assert "logs" in names and runs.foreign_files(run.dir, names) == []  # --overwrite may replace it


def test_the_bar_stops_at_a_signal_and_a_resumed_run_ends_at_100_percent(tmp_path):
    """Stopped by SIGUSR1 at step 5, the bar stays at 5/12 with the reason; the resumed run (--verbose)
    starts its bar at 5, prints the same kinds of lines and ends at 12/12."""
    stopped = runner.train(tmp_path, "run", [*STEPS, "report.progress_bar=on"],
                           env={FAULTS: "signal@step=5,name=USR1"})
    assert stopped.ok, stopped.output()
    bar = last_bar(stopped.proc.stderr)
    assert " 5/12 " in bar and "stopped by a signal" in bar and "100%" not in bar, bar
    assert "eval step 4: " in stopped.proc.stdout and "preempted (signal 10) at step 5" in stopped.proc.stdout

    resumed = runner.train(tmp_path, "run", [*STEPS, "report.progress_bar=on", "resume=auto", "--verbose"])
    assert resumed.ok, resumed.output()
    out, err = resumed.proc.stdout, resumed.proc.stderr
    assert "resumed from step_0000005 (step 5, epoch 1)" in out
    assert re.search(r"^eval step 8: val_loss \S+ val_accuracy \S+", out, re.M), out
    assert re.search(r"^ran all 12 steps; best checkpoint: .*step_\d{7}; exported model: ", out, re.M), out
    assert out.strip().splitlines()[-1].startswith("done: test accuracy ")
    first = [line for line in re.split(r"[\r\n]", err) if line.startswith("train:")][0]
    assert " 5/12 " in first, first
    bar = last_bar(err)
    assert "100%" in bar and " 12/12 " in bar, bar
    assert f"INFO DeepSpeed: {DEEPSPEED_INFO}" in err  # --verbose: the libraries' lines on the console too
    log = rank_log(resumed.dir)  # one file for both launches: the second appends
    assert log.count(DEEPSPEED_INFO) == 2 and log.index("preempted (signal") < log.index("ran all 12 steps")


def test_the_error_that_stops_a_run_is_in_its_log_file(tmp_path):
    run = runner.train(tmp_path, "bad", ["train.max_steps=4", "train.on_nonfinite=stop"],
                       env={FAULTS: "nan_loss@step=2"})
    assert run.proc.returncode == 3, run.output()
    error = [line for line in run.proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "non-finite loss at step 2" in error[0], run.output()
    assert f"ERROR dist_finetune.console: {error[0]}" in rank_log(run.dir)
    assert run.proc.stderr.count("non-finite loss at step 2") == 1  # the console has it once


# ---------------------------------------------------------------- two ranks


@pytest.mark.slow
def test_two_ranks_keep_the_console_to_our_lines_and_each_rank_logs_to_its_file(tmp_path):
    run = runner.train(tmp_path, "two", [*STEPS, "report.progress_bar=off"], nproc=2)
    assert run.ok, run.output()
    console = run.proc.stdout + run.proc.stderr
    for noise in (DEEPSPEED_INFO, "INFO DeepSpeed", "[Rank ", "Using backend config", "FutureWarning"):
        assert noise not in console, (noise, console[-3000:])
    assert len(re.findall(r"^eval step \d+: ", run.proc.stdout, re.M)) == 3  # rank 0 alone, 4, 8, 12
    assert DEEPSPEED_INFO in rank_log(run.dir, 0) and "eval step 12" in rank_log(run.dir, 0)
    other = rank_log(run.dir, 1)
    assert "INFO DeepSpeed: " in other and "eval step" not in other  # its own records; no console lines


@pytest.mark.slow
def test_a_signal_to_one_rank_is_named_as_such_on_rank_0(tmp_path):
    """SIGUSR1 reaches rank 1 only: the ranks agree to save and stop; rank 0, which got no signal, says so
    (it once printed "preempted (signal None)")."""
    run = runner.train(tmp_path, "one", [*STEPS, "report.progress_bar=off"], nproc=2,
                       env={FAULTS: "signal@step=5,name=USR1,rank=1"})
    assert run.ok, run.output()
    assert "preempted (a signal reached another rank) at step 5: checkpoint step_0000005 saved" in run.proc.stdout, \
        run.output()
    assert "None" not in run.proc.stdout + run.proc.stderr


# ---------------------------------------------------------------- the bar, in this process


def bar_reporter(tmp_path: Path, total: int) -> Reporter:
    return Reporter(tmp_path, enabled=True, progress="on", total_steps=total)


def test_the_bar_moves_every_step_and_closes_at_100_percent(tmp_path, capsys):
    r = bar_reporter(tmp_path, 10)
    r.open_progress(0)
    for step in range(1, 8):
        r.advance(step)
        assert r._bar.n == step
    r.step(8, "epoch 1 loss 0.1234 lr 1.00e-03")  # a log step: the numbers beside the bar
    r.advance(9)
    r.advance(10)
    r.close_progress()
    bar = last_bar(capsys.readouterr().err)
    assert "100%" in bar and "10/10" in bar and "loss 0.1234" in bar, bar


def test_a_stopped_bar_stays_at_the_stop_with_its_reason(tmp_path, capsys):
    r = bar_reporter(tmp_path, 10)
    r.open_progress(2)  # a resumed run starts where its checkpoint was
    assert r._bar.n == 2
    for step in range(3, 7):
        r.advance(step)
    r.close_progress("early stop")
    bar = last_bar(capsys.readouterr().err)
    assert "6/10" in bar and "early stop" in bar and "100%" not in bar, bar
    r.close_progress()  # closing twice (the loop's end, then fit's cleanup) is harmless


# ---------------------------------------------------------------- --help and the confusion plot


def test_train_help_is_written_for_users(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "Finetune a GPT-2 model as a text classifier" in text
    assert "examples:\n  python -m dist_finetune.train --config configs/quickstart.yaml\n" in text
    for flag in ("--config FILE", "--overwrite", "--verbose", "--print-config", "--debug", "key=value"):
        assert flag in text, flag
    assert "RUN/logs/train_rankN.log" in text
    for internal in ("rank 0", "rank-0", "broadcast", "Trainer", "gloo"):
        assert internal not in text, internal
    assert parse_args(["--config", "c.yaml", "train.lr=1", "--verbose"]).verbose


def test_the_confusion_plot_has_whole_counts_and_every_label_inside(tmp_path, monkeypatch):
    figures = []
    real_save = report.save_figure
    monkeypatch.setattr(report, "save_figure", lambda fig, path: figures.append(fig) or real_save(fig, path))
    path = tmp_path / "confusion.png"
    names = ["ham", "spam", "phishing"]
    import matplotlib.pyplot as plt

    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: None)  # keep the figure to look at after saving
    report.plot_confusion([[3, 1, 0], [0, 4, 1], [1, 0, 2]], names, path, title="test split (12 examples)")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = figures[0]
    fig.canvas.draw()
    colorbar = fig.axes[1]
    ticks = [t for t in colorbar.get_yticks() if 0 <= t <= 4]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    box = fig.bbox
    for text in (fig.axes[0].yaxis.label, fig.axes[0].xaxis.label, fig.axes[0].title):
        extent = text.get_window_extent()
        assert extent.x0 >= box.x0 and extent.y0 >= box.y0 and extent.x1 <= box.x1 and extent.y1 <= box.y1, text
    close(fig)
