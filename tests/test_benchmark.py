"""tests/benchmark.py --results (a script, not a test): its table writer and its resume logic, without training."""
import json, os, sys, time
from types import SimpleNamespace

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402

ROWS = [dict(arm="random-init", images_per_s=None, wall_s=3.0, knn20=35.0, knn200=36.0, linear=37.0),
        dict(arm="simclr", images_per_s=250.0, wall_s=1800.0, knn20=41.5, knn200=42.0, linear=45.25),
        dict(arm="leoclr", images_per_s=300.0, wall_s=3700.0, knn20=40.0, knn200=41.0, linear=44.0),
        dict(arm="leoclr-baseline", images_per_s=310.0, wall_s=3600.0, knn20=41.0, knn200=41.0, linear=44.0)]


def test_arms_are_random_init_the_frameworks_and_each_method_with_its_baseline():
    arms = benchmark.result_arms(["leoclr"])
    assert [a[0] for a in arms] == ["random-init", "simclr", "mocov2", "byol", "simsiam", "leoclr", "leoclr-baseline"]
    assert arms[-1] == ("leoclr-baseline", "leoclr.py", ["--baseline"]) and arms[1][2] == ["--framework", "simclr"]


def test_table_gains_over_random_init_and_the_own_baseline():
    lines = benchmark.results_table(ROWS).splitlines()
    assert lines[0].startswith("| arm | img/s | training time | kNN k=20 | kNN k=200 | linear |")
    assert lines[2] == "| random-init | - | 0:00:03 | 35.0 | 36.0 | 37.0 | - | - |"
    assert lines[3] == "| simclr | 250.0 | 0:30:00 | 41.5 | 42.0 | 45.2 | +6.5 | - |"
    assert lines[4] == "| leoclr | 300.0 | 1:01:40 | 40.0 | 41.0 | 44.0 | +5.0 | -1.0 |"


def test_plot_is_written(tmp_path):
    benchmark.results_plot(ROWS, str(tmp_path / "assets" / "results.png"))
    assert (tmp_path / "assets" / "results.png").stat().st_size > 1000


def test_a_killed_run_resumes_and_a_finished_arm_is_skipped(tmp_path):
    """Killed during the evaluation: the rerun trains again (the script resumes from its checkpoint, here a finished
    one), keeps the first training time, evaluates, and marks the arm done; a third run calls nothing."""
    calls = []

    def run(cmd, log, on_line=None, fail=[True]):
        calls.append(os.path.basename(cmd[1]))
        if cmd[1].endswith("linear_eval.py"):
            if fail[0]:
                fail[0] = False
                raise KeyboardInterrupt  # the kill
            return {"runs": {cmd[2]: {"knn_top1": 40.0, "knn_top1_k200": 41.0, "linear_top1": 44.0}}}
        time.sleep(0.2)  # training
        return {"images_per_s": 123.0}

    a = SimpleNamespace(out=str(tmp_path), data="DATA", epochs=2, seed=0, extra=["--subset", "64"], gpus=0)
    arm = ("leoclr-baseline", "leoclr.py", ["--baseline"])
    with pytest.raises(KeyboardInterrupt):
        benchmark.run_arm(arm, a, run)
    partial = json.load(open(tmp_path / "leoclr-baseline" / "result.json.partial"))["wall_s"]
    result = benchmark.run_arm(arm, a, run)
    assert calls == ["leoclr.py", "linear_eval.py", "leoclr.py", "linear_eval.py"]
    assert result["wall_s"] >= partial + 0.15 and result["command"] == "leoclr.py --baseline"  # both trainings
    assert (result["images_per_s"], result["knn20"], result["knn200"], result["linear"]) == (123.0, 40.0, 41.0, 44.0)
    assert benchmark.run_arm(arm, a, run) == result and len(calls) == 4
    assert not (tmp_path / "leoclr-baseline" / "result.json.partial").exists()


def test_a_run_killed_during_training_keeps_its_training_time(tmp_path):
    """The training time so far is saved at every output line: a kill in the middle of training keeps it, and the
    rerun (which resumes the script's checkpoint) adds its own."""
    def run(cmd, log, on_line=None, killed=[False]):
        if cmd[1].endswith("linear_eval.py"):
            return {"runs": {cmd[2]: {"knn_top1": 40.0, "knn_top1_k200": 41.0, "linear_top1": 44.0}}}
        for _ in range(3):  # three progress lines, 0.1 s apart
            time.sleep(0.1)
            on_line()
        if not killed[0]:
            killed[0] = True
            raise KeyboardInterrupt  # the kill, after the third line
        return {"images_per_s": 123.0}

    a = SimpleNamespace(out=str(tmp_path), data="DATA", epochs=2, seed=0, extra=[], gpus=0)
    arm = ("simclr", "common.py", ["--framework", "simclr"])
    with pytest.raises(KeyboardInterrupt):
        benchmark.run_arm(arm, a, run)
    first = json.load(open(tmp_path / "simclr" / "result.json.partial"))["wall_s"]
    assert first >= 0.3  # the three lines' time, not lost with the kill
    result = benchmark.run_arm(arm, a, run)
    assert result["wall_s"] >= first + 0.3 - 0.05 and result["images_per_s"] == 123.0  # wall_s: rounded to 0.1 s


def test_a_recorded_arm_is_not_run_again_for_the_same_job(tmp_path, monkeypatch):
    """The record (assets/results.json) outlives --out: an arm recorded for the same job is taken from it and not
    trained; a different job (here: other epochs) trains it again and replaces its row."""
    calls = []

    def run_arm(arm, a):
        calls.append((arm[0], a.epochs))
        return dict(arm=arm[0], images_per_s=100.0, wall_s=1.0, knn20=40.0 + a.epochs, knn200=41.0, linear=44.0)

    monkeypatch.setattr(benchmark, "run_arm", run_arm)
    record = str(tmp_path / "assets" / "results.json")
    a = lambda epochs, out: SimpleNamespace(data="DATA", out=str(tmp_path / out), methods=["random-init", "simclr"],
                                            epochs=epochs, seed=0, extra=[], record=record,
                                            plot=str(tmp_path / "results.png"))
    benchmark.results(a(2, "first"))
    rows = benchmark.read_record(record)
    assert calls == [("random-init", 2), ("simclr", 2)] and rows["simclr"]["knn20"] == 42.0
    assert rows["simclr"]["job"] == {"data": "DATA", "epochs": 2, "seed": 0, "extra": []} and rows["simclr"]["commit"]
    benchmark.results(a(2, "other-out"))  # --out lost: nothing trains again
    table = open(tmp_path / "other-out" / "results.md").read()
    assert len(calls) == 2 and "| simclr | 100.0 | 0:00:01 | 42.0 |" in table
    benchmark.results(a(3, "first"))  # another job: trained again, its rows replaced
    assert calls[2:] == [("random-init", 3), ("simclr", 3)] and benchmark.read_record(record)["simclr"]["knn20"] == 43.0
