"""The Trainer's decision after each optimizer step, and the early stopper, in this process (one real
gloo rank; evaluation and saving are recorded instead of run)."""
from __future__ import annotations

import signal
from pathlib import Path

import pytest

import torch

from dist_finetune.config import load_config
from dist_finetune.nonfinite import StepGuard
from dist_finetune.report import Reporter
from dist_finetune.step import RunningSums
from dist_finetune.trainer import CONTINUE, NEW_BEST, STOP, EarlyStopper, Trainer, TrainState


def test_early_stopper_counts_bad_evaluations_and_respects_min_delta():
    es = EarlyStopper("min", patience=2, min_delta=0.1)
    assert es.update(1.0) == NEW_BEST
    assert es.update(0.95) == CONTINUE  # better, but not by min_delta
    assert es.update(0.5) == NEW_BEST and es.bad_evals == 0
    assert es.update(0.6) == CONTINUE
    assert es.update(0.55) == STOP
    never = EarlyStopper("max", patience=1, min_delta=0.0, enabled=False)
    assert [never.update(v) for v in (0.5, 0.4, 0.3)] == [NEW_BEST, CONTINUE, CONTINUE]


class Recorder:
    """A Trainer whose evaluation returns scripted verdicts and whose saves are recorded."""

    def __init__(self, env, overrides: list[str], verdicts: dict[int, int], total_steps: int = 100) -> None:
        cfg = load_config(None, ["output_dir=/nonexistent", "train.sync_every_steps=1", *overrides])
        t = Trainer(cfg, env)
        t.state, t.total_steps, t.deferred, t.done = TrainState(), total_steps, False, False
        t.sums, t.last_log_step, t.last_saved_step = RunningSums(env.device), -1, -1
        t.reporter = Reporter(Path("/nonexistent"), enabled=False)
        t.guard = StepGuard(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1), env, True)
        self.trainer, self.verdicts = t, verdicts
        self.saves: list[tuple[int, bool]] = []
        self.evals: list[int] = []
        self.logs: list[int] = []
        t.log_line = lambda: self.logs.append(t.state.global_step) or setattr(t, "last_log_step", t.state.global_step)
        t.evaluate_and_decide = self._evaluate
        t.save = self._save

    def _evaluate(self) -> int:
        s = self.trainer.state
        self.evals.append(s.global_step)
        s.last_eval_step = s.global_step
        return self.verdicts.get(s.global_step, CONTINUE)

    def _save(self, is_best: bool) -> None:
        self.saves.append((self.trainer.state.global_step, is_best))
        self.trainer.last_saved_step = self.trainer.state.global_step

    def steps(self, last: int, epoch_end_at: tuple[int, ...] = ()) -> None:
        t = self.trainer
        while t.state.global_step < last and not t.done:
            t.state.global_step += 1
            t.decide(epoch_end=t.state.global_step in epoch_end_at)


def test_decide_evaluates_saves_the_best_and_periodic_checkpoints(dist_env):
    r = Recorder(dist_env, ["eval.every_steps=5", "checkpoint.every_steps=4", "train.log_every_steps=3"],
                 verdicts={5: NEW_BEST, 10: CONTINUE, 15: NEW_BEST})
    r.steps(16)
    assert r.evals == [5, 10, 15]
    assert r.saves == [(4, False), (5, True), (8, False), (12, False), (15, True), (16, False)]
    assert r.logs == [3, 6, 9, 12, 15]
    assert r.trainer.state.best_step is None  # set by the real evaluate_and_decide, not by decide
    assert not r.trainer.done


def test_decide_evaluates_and_saves_once_at_an_epochs_end_and_the_runs_end(dist_env):
    r = Recorder(dist_env, ["eval.every_steps=4"], verdicts={}, total_steps=10)
    r.steps(10, epoch_end_at=(4, 7))
    # Step 4 is both an evaluation point and an epoch's end: one evaluation, one save.
    assert r.evals == [4, 7, 8, 10]
    assert r.saves == [(4, False), (7, False), (10, False)]
    assert r.trainer.done and not r.trainer.state.stopped_early
    r.trainer.decide(epoch_end=True)  # called again at the same step (the loop's epoch-end call)
    assert r.evals == [4, 7, 8, 10] and r.saves[-1] == (10, False)


def test_decide_stops_on_the_broadcast_verdict_and_saves_that_step(dist_env):
    r = Recorder(dist_env, ["eval.every_steps=2"], verdicts={2: NEW_BEST, 4: CONTINUE, 6: STOP})
    r.steps(50)
    assert r.trainer.done and r.trainer.state.stopped_early
    assert r.trainer.state.global_step == 6
    assert r.saves == [(2, True), (6, False)]


def test_decide_on_a_signal_saves_and_marks_the_run_preempted(dist_env):
    r = Recorder(dist_env, ["eval.every_steps=10"], verdicts={})
    r.steps(3)
    r.trainer.signals.received = signal.SIGUSR1
    r.steps(4)
    assert r.trainer.done and r.trainer.state.preempted
    assert r.saves == [(4, False)] and r.evals == []


def test_decide_under_deferred_checks_stops_before_saving_a_bad_update(dist_env):
    from dist_finetune.nonfinite import NonFiniteError

    r = Recorder(dist_env, ["checkpoint.every_steps=2", "train.nonfinite_check=deferred", "train.on_nonfinite=stop"],
                 verdicts={})
    r.trainer.deferred, r.trainer.checked_step = True, 0
    r.trainer.run_dir = None
    r.trainer.last_good = lambda: "checkpoint step_0000002"
    r.trainer.plan = type("Plan", (), {"grad_accum_steps": 1})()
    r.steps(2)
    r.trainer.sums.sums[4] += 1  # a non-finite loss in step 3
    with pytest.raises(NonFiniteError, match="between steps 3 and 3.*step_0000002"):
        r.steps(3)
    assert r.saves == [(2, False)]


def test_an_fp16_overflow_step_is_not_counted_as_a_step(dist_env):
    """DeepSpeed counts a step it skipped on a loss-scale overflow in `skipped_steps`; the trainer's
    global_step (and with it max_steps, evaluations, the schedule's position) counts real steps only."""
    import time
    from types import SimpleNamespace

    import torch

    from dist_finetune.nonfinite import StepGuard

    t = Trainer(load_config(None, ["output_dir=/nonexistent"]), dist_env)
    t.state, t.deferred, t.tick = TrainState(), False, time.perf_counter()
    t.engine, t.ds_skipped = SimpleNamespace(skipped_steps=0), 0
    t.reporter = Reporter(Path("/nonexistent"), enabled=False)
    p = torch.nn.Parameter(torch.zeros(2))
    t.guard = StepGuard(torch.optim.SGD([p], lr=0.1), dist_env, agree_each_step=True)
    t.guard_skipped = 0
    assert t.after_window() and t.state.global_step == 1
    t.engine.skipped_steps = 1  # this window overflowed
    assert not t.after_window()
    assert t.state.global_step == 1 and t.state.overflow_steps == 1
    assert t.after_window() and t.state.global_step == 2


def test_a_checkpoint_with_an_unusable_training_state_is_one_user_error(dist_env):
    from dist_finetune.runs import RunError

    t = Trainer(load_config(None, ["output_dir=/nonexistent"]), dist_env)
    t.run_dir = Path("/nonexistent")
    state, stopper = t.restored_state({"train_state": {"global_step": 3, "stopper": {"mode": "min", "patience": 2,
                                                                                      "min_delta": 0.0}}}, "step_3")
    assert state.global_step == 3 and stopper.patience == 2
    for client in ({}, {"train_state": {"no_such_key": 1}}, {"train_state": {"stopper": {"mode": "min"}}}):
        with pytest.raises(RunError, match="step_3 records no usable training state"):
            t.restored_state(client, "step_3")


def test_ctrl_c_counts_only_when_it_stopped_the_run(dist_env):
    """A Ctrl-C that arrives during the final evaluation or export does not turn a finished run into 130."""
    t = Trainer(load_config(None, ["output_dir=/nonexistent"]), dist_env)
    t.signals.received = signal.SIGINT
    assert not t.interrupted
    t.state.preempted = True
    assert t.interrupted
    t.signals.received = signal.SIGUSR1
    assert not t.interrupted


@pytest.mark.parametrize("manifest", ["[]", '{"files": []}', '{"files": {"a.pt": {}}}', '{"files": {"a.pt": 3}}',
                                      '{"files": {"../../etc/passwd": {"size": 1}}}'])
def test_a_malformed_manifest_is_a_damaged_checkpoint_not_a_crash(tmp_path, manifest):
    from dist_finetune.checkpoint import verify

    (tmp_path / "a.pt").write_bytes(b"x")
    (tmp_path / "manifest.json").write_text(manifest)
    assert verify(tmp_path) is not None


def test_a_damaged_run_state_is_one_user_error(tmp_path):
    from dist_finetune.runs import RunError, saved_world_size

    (tmp_path / "checkpoints" / "step_1").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_1" / "run_state.json").write_text("{not json")
    with pytest.raises(RunError, match="run_state.json is damaged"):
        saved_world_size(tmp_path, "step_1")


def test_decide_checks_the_parameters_before_it_logs_evaluates_or_saves(dist_env):
    from dist_finetune.nonfinite import NonFiniteError

    r = Recorder(dist_env, ["checkpoint.every_steps=2", "eval.every_steps=2"], verdicts={2: NEW_BEST})
    r.trainer.last_good = lambda: "checkpoint step_0000002"
    r.steps(2)
    with torch.no_grad():
        r.trainer.guard.params()[0][0] = float("inf")
    r.steps(3)  # nothing is logged, evaluated or saved at step 3: no check needed yet
    with pytest.raises(NonFiniteError, match="parameters became non-finite at step 4.*step_0000002"):
        r.steps(4)
    assert r.saves == [(2, True)] and r.evals == [2] and r.logs == []
