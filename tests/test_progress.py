"""bertfast.progress.Progress: the one progress line of ``SentenceEncoder.encode``, ``bertfast
encode --input`` (also with Ray) and ``bertfast finetune``: redrawn in place on a terminal, plain
lines in a log (every tenth of the work and at least every INTERVAL seconds), rate and ETA of
this run only (a resumed job's earlier work counts in the position, not in the speed)."""
import io
import types

import pytest

from bertfast import progress
from bertfast.progress import Progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(perf_counter=c.perf_counter))
    return c


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_every_long_job_uses_the_one_printer():
    import bertfast.corpus
    import bertfast.distributed
    import bertfast.sentence
    import bertfast.train

    assert bertfast.sentence.Progress is bertfast.corpus.Progress is bertfast.train.Progress is Progress
    for module in (bertfast.sentence, bertfast.corpus, bertfast.train, bertfast.distributed):
        assert not [n for n in vars(module) if n in ("_Progress", "_RunProgress", "_StepProgress", "_Quiet")]


def test_the_line_rate_and_eta_of_this_run(clock):
    bar = Progress(1000, "encoding in.txt", unit="rows", done=600, show=True, stream=io.StringIO())
    clock.now = 10.0
    bar.update(100)  # 100 rows in 10 s: 10 rows/s, 300 left
    assert bar._line() == "encoding in.txt: 700/1,000 rows ( 70%), 10.0 rows/s, 10.0s, ETA 30.0s"
    clock.now = 130.0
    bar.update(300)
    assert bar._line() == "encoding in.txt: 1,000/1,000 rows (100%), 3.1 rows/s, 2m10s"  # done: no ETA


def test_training_line_rates_and_loss(clock):
    bar = Progress(10, "epoch 1/2", unit="batches", show=True, stream=io.StringIO(), rates=("examples", "tokens"))
    assert "loss" not in bar._line() and "nan" not in bar._line()
    clock.now = 2.0
    bar.examples += 64
    bar.tokens += 1000
    bar.loss = 0.5
    bar.update(1)
    assert bar._line() == "epoch 1/2: 1/10 batches ( 10%), loss 0.5000, 32.0 examples/s, 500 tokens/s, 2.0s, ETA 18.0s"


def test_terminal_one_line_redrawn_in_place(clock):
    out = Terminal()
    bar = Progress(1000, "x", show=True, stream=out)
    bar.update(10)  # the first update draws
    bar.update(10)  # too soon: no redraw
    clock.now = 0.2
    bar.update(10)
    clock.now = 200.0
    bar.update(970)  # done: drawn at once
    bar.close()
    text = out.getvalue()
    assert text.count("\r") == 4 and text.endswith("\n") and text.count("\n") == 1
    draws = text[:-1].split("\r")[1:]
    assert [d.split(":")[1].split()[0] for d in draws] == ["10/1,000", "30/1,000", "1,000/1,000", "1,000/1,000"]
    # a shorter line overwrites all of a longer one
    assert all(len(b) >= len(a.rstrip()) for a, b in zip(draws, draws[1:]))


def test_log_lines_every_tenth_and_every_interval(clock):
    log = io.StringIO()
    bar = Progress(1000, "x", show=True, stream=log, interval=30.0)
    for _ in range(20):  # 50 rows a second: a line per tenth of the work, none in between
        clock.now += 1.0
        bar.update(50)
    bar.close()  # the last line is up to date: nothing more
    lines = log.getvalue().splitlines()
    assert [ln.split()[1] for ln in lines] == ["50/1,000"] + [f"{n:,}/1,000" for n in range(100, 1001, 100)]
    assert "\r" not in log.getvalue()
    # a slow job: a line at least every interval seconds, within a tenth too
    log = io.StringIO()
    bar = Progress(100_000, "x", show=True, stream=log, interval=30.0)
    for _ in range(10):
        clock.now += 20.0
        bar.update(100)
    bar.close()
    lines = log.getvalue().splitlines()  # the first update, then 30 s or more apart, the last at close
    assert [ln.split()[1] for ln in lines] == [f"{n:,}/100,000" for n in (100, 300, 500, 700, 900, 1000)]


def test_shown_when_asked_or_when_there_is_much_to_do():
    for total, done, show, shown in [(100, 0, None, False), (1000, 0, None, True), (1000, 900, None, False),
                                     (10, 0, True, True), (10_000, 0, False, False), (10, 10, True, False)]:
        log = io.StringIO()
        bar = Progress(total, "x", done=done, show=show, stream=log, interval=0.0)
        bar.update(total - done)
        bar.close()
        assert bool(log.getvalue()) == shown, (total, done, show)


def test_encode_shows_progress_in_a_log(monkeypatch):
    """SentenceEncoder.encode(show_progress=True) with stderr redirected: plain lines every
    INTERVAL seconds (0 here: every batch), not only every tenth of the texts however long a
    tenth takes; encode_file's lines come from the same printer (tests/test_data_files.py)."""
    import torch

    from bertfast.sentence import SentenceEncoder

    log = io.StringIO()
    monkeypatch.setattr(progress, "INTERVAL", 0.0)
    monkeypatch.setattr(progress.sys, "stderr", log)
    enc = SentenceEncoder("minilm", device="cpu")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        enc.encode(["a b c"] * 30, batch_size=1, show_progress=True)
    finally:
        torch.set_num_threads(before)
    lines = log.getvalue().splitlines()
    assert [ln.split()[1] for ln in lines] == [f"{n}/30" for n in range(1, 31)], lines
    assert lines[-1].startswith("encoding: 30/30 texts (100%), ")
