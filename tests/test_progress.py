"""The progress line (services/progress.py): in a log, a line per quarter of
the stage and none before a rate is known; on a terminal, in place."""
from __future__ import annotations

import io

from services.progress import LineDrawer


def test_a_log_gets_a_line_per_quarter_and_none_without_a_rate(monkeypatch):
    clock = iter(range(1000))
    monkeypatch.setattr("services.progress.time.time", lambda: float(next(clock)))
    lines: list[str] = []
    d = LineDrawer("DP fine-tuning", lines.append, tty=False)
    for step in range(0, 101):
        d(step, 100)
    # the first call only starts the clock; then one line as each quarter is passed
    assert [line.split(": ")[1].split(" ")[0] for line in lines] == \
        ["25/100", "50/100", "75/100", "100/100"]
    assert not any("0.00 steps/s" in line or "ETA ?" in line for line in lines)
    # control: the same counts on a terminal redraw in place, every call
    out = io.StringIO()
    t = LineDrawer("DP fine-tuning", lines.append, stream=out, tty=True)
    for step in range(0, 11):
        t(step, 10)
    t.close()
    assert out.getvalue().count("\r") == 10 and out.getvalue().endswith("\n")


def test_lines_said_to_the_board_reach_the_log_as_they_come_and_once(ray_local):
    import time

    from services.progress import ProgressPoster, progress_line

    log: list[str] = []
    said: list[str] = []
    with progress_line("test-run", "evaluate", "evaluation", log.append, tty=False,
                       said=said) as name:
        poster = ProgressPoster(name)  # as an actor holds it
        poster.say("[evaluate] detector")
        poster.say("[evaluate] canary audit")
        deadline = time.time() + 20
        while len(log) < 2 and time.time() < deadline:
            time.sleep(0.2)
        assert log == ["[evaluate] detector", "[evaluate] canary audit"]  # before the end
        poster.say("[evaluate] memorisation checks")  # said just before the block ends
    assert said == log == ["[evaluate] detector", "[evaluate] canary audit",
                           "[evaluate] memorisation checks"]
    # control: without a board (a stage run outside the pipeline) saying is a no-op
    ProgressPoster(None).say("nothing")
