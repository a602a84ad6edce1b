"""Progress a person sees: a bar in a terminal, today's lines in a log (a file, a pipe, a Ray job's log)."""

from __future__ import annotations

import io
import sys
import threading

from hlip_ray.progress import Progress


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as a console does."""

    def isatty(self) -> bool:
        return True


def test_in_a_log_progress_is_a_line_at_the_start_every_interval_and_at_the_end():
    log = io.StringIO()
    progress = Progress("eval: encoded studies", 10, stream=log, every_s=3600)
    for done in range(1, 8):
        progress.update(done, "2.0 studies/s")
    progress.close()   # 7 of 10: three could not be read
    lines = log.getvalue().splitlines()
    assert [line.split("  ")[0] for line in lines] == ["eval: encoded studies 1/10 (10%)",
                                                       "eval: encoded studies 7/10 (70%)"]
    assert "2.0 studies/s" in lines[0] and "elapsed 0m00s" in lines[0] and "ETA" in lines[0]
    assert "\r" not in log.getvalue()

    log = io.StringIO()
    progress = Progress("embed: studies embedded", 3, stream=log, every_s=3600)
    for done in (1, 2, 3):
        progress.update(done)
    progress.close()   # the last line said it already
    assert [line.split("  ")[0] for line in log.getvalue().splitlines()] == [
        "embed: studies embedded 1/3 (33%)", "embed: studies embedded 3/3 (100%)"]


def test_in_a_terminal_progress_is_a_bar_with_its_note_and_lines_of_their_own_above_it():
    console = Terminal()
    progress = Progress("train", 8, stream=console, unit="steps")
    progress.update(3, "loss 2.413")
    progress.write("checkpoint at step 3: val zero-shot AUC 0.712 -> s3://b/runs/r/checkpoint_00000003")
    progress.update(8, "loss 2.001")
    progress.close()
    shown = console.getvalue()
    assert "\r" in shown and "3/8" in shown and "8/8" in shown and "loss 2.001" in shown and "steps" in shown
    assert "\rcheckpoint at step 3: val zero-shot AUC 0.712 -> s3://b/runs/r/checkpoint_00000003\n" in shown
    assert "elapsed" not in shown   # no log lines


def test_training_progress_is_a_bar_in_a_terminal_and_lines_in_a_log(ray_session, tmp_path, monkeypatch):
    """The driver's printer of a run log: in a terminal the steps as a bar and the checkpoint lines above it;
    in a log the progress lines themselves."""
    from hlip_ray.train.tracking import print_progress, start_run_log

    values = {"lr": 1e-3, "studies_per_s": 4.0, "data_wait_fraction": 0.1}
    for stream in (Terminal(), io.StringIO()):
        run_log = start_run_log(tmp_path / type(stream).__name__, 4)
        for step in (1, 2, 3, 4):
            ray_session.get(run_log.log_step.remote({**values, "step": step, "loss": 3.0 - step / 4}, float(step),
                                                    "s3://b/runs/r/checkpoint_00000004" if step == 4 else None))
        monkeypatch.setattr(sys, "stdout", stream)
        stop = threading.Event()
        stop.set()   # print what there is, then end
        print_progress(run_log, stop, 4, every_s=0.01)
        monkeypatch.undo()
        ray_session.kill(run_log)
        shown = stream.getvalue()
        assert "checkpoint at step 4" in shown
        if isinstance(stream, Terminal):
            assert "4/4" in shown and "loss 2.000" in shown and "4.0 studies/s" in shown and "\r" in shown
            assert "\nstep " not in shown and not shown.startswith("step ")
        else:
            assert [line.split("  ")[0] for line in shown.splitlines() if line.startswith("step ")] == [
                "step 1/4 (25%)", "step 4/4 (100%)"]
            assert "\r" not in shown
