"""Interrupting ``bertfast finetune`` and resuming it: a SIGINT at any moment (inside the optimizer
step, a checkpoint save, an evaluation) and a process death between any two file operations of
a checkpoint save leave a checkpoint from which ``--resume`` reaches the uninterrupted run's
weights and metrics bit for bit; a batch with no labelled token is skipped and counted."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import bertfast
import bertfast.cli
import bertfast.train as bt

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]


@pytest.fixture(scope="module")
def word_model(tmp_path_factory):
    """A random 2-layer, 32-wide BERT over the counting words: an MLM head of 17 tokens."""
    d = tmp_path_factory.mktemp("tiny_words")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(WORDS)
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (d / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 128}))
    cfg = bertfast.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.1,
                              attention_probs_dropout_prob=0.1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        bertfast.BertModel(cfg).save_pretrained(d)
    return str(d)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlm_data")
    rng = random.Random(5)
    rows = lambda n: [{"text": " ".join([rng.choice(WORDS)] * rng.randint(10, 16))} for _ in range(n)]  # noqa: E731
    return write_jsonl(d / "train.jsonl", rows(48)), write_jsonl(d / "eval.jsonl", rows(8))


def args(data, model, out, *extra, save_steps=2):
    train, held_out = data
    return ["finetune", "--no-progress", "--task", "mlm", "--train", train, "--eval", held_out, "--model", model,
            "--out", str(out), "--batch-size", 4, "--grad-accum", 2, "--epochs", 2, "--lr", 3e-3, "--seed", 3,
            "--max-length", 16, *(["--save-steps", save_steps] if save_steps else []), *extra]


def finetune(capsys, argv):
    rc = bertfast.cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def result(out):
    """(final weights, metrics.json history) of a finished run in ``out``."""
    from safetensors.torch import load_file

    return load_file(out / "model.safetensors"), json.loads((out / "metrics.json").read_text())["history"]


def assert_same_run(a, b):
    wa, ha = a
    wb, hb = b
    assert wa.keys() == wb.keys()
    diff = {k: float((wa[k] - wb[k]).abs().max()) for k in wa if not torch.equal(wa[k], wb[k])}
    assert not diff, f"weights differ from the uninterrupted run: {diff}"
    assert ha == hb


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data, word_model):
    """The uninterrupted run: final weights, history, wall time."""
    out = tmp_path_factory.mktemp("ref") / "out"
    t0 = time.perf_counter()
    assert bertfast.cli.main([str(a) for a in args(data, word_model, out)]) == 0
    return result(out), time.perf_counter() - t0


def _interrupt_then_resume(tmp_path, capsys, data, word_model, reference, monkeypatch, method, patched, step,
                           resumed):
    """Run finetune with ``bt._Trainer.<method>`` replaced by ``patched`` (which sends SIGINT):
    it stops with "interrupted; checkpoint at step ``step``"; then --resume with the original
    method says ``resumed`` and ends bit-identical to the uninterrupted run."""
    original = getattr(bt._Trainer, method)
    out = tmp_path / "out"
    monkeypatch.setattr(bt._Trainer, method, patched)
    rc, _, err = finetune(capsys, args(data, word_model, out))
    assert rc == 130 and f"interrupted; checkpoint at step {step}" in err, err
    monkeypatch.setattr(bt._Trainer, method, original)
    rc, _, err = finetune(capsys, args(data, word_model, out, "--resume"))
    assert rc == 0 and resumed in err, err
    assert_same_run(result(out), reference[0])


def test_sigint_inside_the_optimizer_step(tmp_path, capsys, data, word_model, reference, monkeypatch):
    """A real SIGINT delivered while optimizer.step() runs (from its post-hook, after every weight
    was updated): the checkpoint must hold those weights with the position after the step, not
    the previous step's position (then --resume would apply that batch's update twice)."""
    load = bt._Trainer._load

    def load_with_hook(self):
        load(self)
        steps = []

        def hook(opt, a, kw):
            steps.append(1)
            if len(steps) == 3:  # the 3rd optimizer step of this process
                os.kill(os.getpid(), signal.SIGINT)

        self.optimizer.register_step_post_hook(hook)

    _interrupt_then_resume(tmp_path, capsys, data, word_model, reference, monkeypatch, "_load", load_with_hook, 3,
                           "resuming at step 3/")


def test_sigint_while_the_final_model_is_written(tmp_path, capsys, data, word_model, reference, monkeypatch):
    """The last moment of a run: the checkpoint of the last epoch is written, the model is being
    written to --out.  The interruption says where the checkpoint is, and --resume writes the model."""
    save = bt._Trainer._save_model

    def save_then_interrupt(self, directory):
        save(self, directory)
        if directory == self.out:
            os.kill(os.getpid(), signal.SIGINT)

    _interrupt_then_resume(tmp_path, capsys, data, word_model, reference, monkeypatch, "_save_model",
                           save_then_interrupt, 12, "resuming at step 12/12")


def _interrupt_at(delay, argv):
    """Run bertfast finetune in this process; a thread sends this process SIGINT after ``delay``
    seconds.  Returns the exit status (130: interrupted; None: the signal came after the run)."""
    timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT))
    try:
        try:
            timer.start()
            rc = bertfast.cli.main([str(a) for a in argv])
        finally:
            timer.cancel()
            timer.join()
    except KeyboardInterrupt:  # the run had finished when the signal was handled
        rc = None
    return rc


def test_sigint_at_random_moments_resumes_bit_identical(tmp_path, capsys, data, word_model, reference):
    """24 runs, each sent SIGINT at a random moment of its run time (setup, micro-batches, the
    optimizer step, checkpoint saves, evaluation, the final save), then resumed (a fresh run when
    the signal came before training began): every one ends bit-identical to the uninterrupted run.
    A trial whose run ended before the signal, or held it back to its end (exit 0, also checked
    bit-identical), tries again with the signal earlier, so that the check does not depend on how
    steady the machine's speed is."""
    ref, _ = reference
    t0 = time.perf_counter()  # a run's time once everything is imported and warm
    assert bertfast.cli.main([str(a) for a in args(data, word_model, tmp_path / "timed")]) == 0
    seconds = time.perf_counter() - t0
    rng = random.Random(2026)
    interrupted = 0
    for trial in range(24):
        delay = rng.uniform(0.02, 1.0) * seconds
        for attempt in range(6):
            out = tmp_path / f"t{trial}-{attempt}"
            rc = _interrupt_at(delay, args(data, word_model, out))
            capsys.readouterr()
            if rc == 130:
                break
            if rc == 0:  # the signal was held back to the end of the run: it ends as an uninterrupted run
                assert_same_run(result(out), ref)
            # (or the run, faster than the timed one on a machine whose speed varies, finished first):
            # try this trial again with the signal earlier
            delay /= 2
        if rc == 130:
            interrupted += 1
            resume = ["--resume"] if (out / "checkpoint" / bt.STATE_FILE).is_file() else []
            rc, _, err = finetune(capsys, args(data, word_model, out, *resume))
            assert rc == 0, (trial, err)
        assert rc in (0, None), trial
        assert_same_run(result(out), ref)
    assert interrupted >= 20  # a signal landed inside nearly every trial (each tries again earlier up to 6 times)


def _finetune_argv(data, model, out, *extra):
    """``python -m bertfast finetune ...`` with a progress line on stderr (a pipe: a line per 10 %)."""
    argv = [str(a) for a in args(data, model, out, *extra) if a != "--no-progress"]
    return [sys.executable, "-m", "bertfast"] + argv + ["--progress", "--threads", "1"]


@pytest.mark.slow
def test_kill_int_of_a_process_at_random_moments(tmp_path, data, word_model, reference):
    """The same with a real ``kill -INT`` of a ``bertfast finetune`` process: once it has started
    training (a line on stderr), SIGINT at a random moment, then --resume.  6 trials (two process
    starts each: about a minute on a quiet 2-core machine); the 24 trials above send the same
    signal to the same command in this process.  ``BERTFAST_SIGINT_TRIALS=20`` runs more."""
    ref, _ = reference
    rng = random.Random(7)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for trial in range(int(os.environ.get("BERTFAST_SIGINT_TRIALS", "6"))):
        out = tmp_path / f"p{trial}"
        p = subprocess.Popen(_finetune_argv(data, word_model, out), stderr=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, env=env, text=True)
        line = "-"
        while line and not line.startswith("epoch 1/"):  # the first progress line: training runs
            line = p.stderr.readline()
        assert line, f"bertfast finetune ended before training (exit status {p.wait()})"
        time.sleep(rng.uniform(0.0, 1.2))
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=300)
        if p.returncode != 0:
            # 130: interrupted (bertfast's exit status); -SIGINT: the run had finished and the
            # signal came during the interpreter's exit
            assert p.returncode in (130, -signal.SIGINT), err[-2000:]
            assert p.returncode != 130 or "interrupted; checkpoint at step" in err, err[-2000:]
            done = subprocess.run(_finetune_argv(data, word_model, out, "--resume"), capture_output=True, text=True,
                                  timeout=300, env=env)
            assert done.returncode == 0, done.stderr[-2000:]
        assert_same_run(result(out), ref)


# ----------------------------------------------------------------------------- atomic checkpoints
def test_death_between_any_two_steps_of_a_save_leaves_a_checkpoint(tmp_path, capsys, data, word_model, reference,
                                                                  monkeypatch):
    """The process dies right after each file-system operation (mkdir, rename, replace, symlink,
    unlink, rmtree) of the 2nd checkpoint save in turn (SystemExit from that call: nothing of
    the save after it runs): every time, --resume finds a whole checkpoint (the 1st or the 2nd)
    and ends bit-identical to the uninterrupted run."""
    
    events = []
    saves = [0]
    die_at = [None]

    def counting(name, fn):
        def wrapper(*a, **k):
            r = fn(*a, **k)
            if saves[0] == 2:
                events.append(name)
                if len(events) == die_at[0]:
                    raise SystemExit("died")
            return r
        return wrapper

    save = bt._Trainer._save_checkpoint

    def counting_save(self, *a, **k):
        saves[0] += 1
        try:
            return save(self, *a, **k)
        finally:
            if saves[0] == 2:
                saves[0] = 3  # only the 2nd save is counted

    monkeypatch.setattr(bt._Trainer, "_save_checkpoint", counting_save)
    for mod, attr in ((os, "mkdir"), (os, "rename"), (os, "replace"), (os, "symlink"), (os, "unlink"),
                      (shutil, "rmtree")):
        monkeypatch.setattr(mod, attr, counting(attr, getattr(mod, attr)))
    out = tmp_path / "count"  # how many operations the 2nd save makes
    assert finetune(capsys, args(data, word_model, out, "--stop-after-steps", 4))[0] == 0
    n_ops = len(events)
    assert n_ops >= 3, events
    for k in range(1, n_ops + 1):
        out = tmp_path / f"die{k}"
        events.clear()
        die_at[0], saves[0] = k, 0
        with pytest.raises(SystemExit, match="died"):
            bertfast.cli.main([str(a) for a in args(data, word_model, out)])
        die_at[0] = None
        capsys.readouterr()
        rc, _, err = finetune(capsys, args(data, word_model, out, "--resume"))
        assert rc == 0 and "resuming at step" in err, (k, events, err)
        assert_same_run(result(out), reference[0])
        leftovers = {p.name for p in out.iterdir() if "checkpoint" in p.name}
        assert leftovers <= {"checkpoint", os.path.basename(os.path.realpath(out / "checkpoint"))}, leftovers


def test_no_checkpoint_writes_none_and_refuses_resume_options(tmp_path, capsys, data, word_model):
    out = tmp_path / "out"
    rc, _, err = finetune(capsys, args(data, word_model, out, "--no-checkpoint", save_steps=0))
    assert rc == 0, err
    assert (out / "model.safetensors").is_file() and not (out / "checkpoint").exists()
    assert not [p for p in out.iterdir() if "checkpoint" in p.name]
    rc, _, err = finetune(capsys, args(data, word_model, out, "--no-checkpoint", "--overwrite"))
    assert rc == 1 and err.startswith("bertfast: error: ") and "save_steps cannot apply" in err
    # a run with checkpoints, then --overwrite --no-checkpoint: the old run's checkpoint goes too
    other = tmp_path / "other"
    assert finetune(capsys, args(data, word_model, other, "--epochs", 1))[0] == 0
    assert (other / "checkpoint" / bt.STATE_FILE).is_file()
    rc, _, err = finetune(capsys, args(data, word_model, other, "--no-checkpoint", "--overwrite", save_steps=0))
    assert rc == 0, err
    assert not [p for p in other.iterdir() if "checkpoint" in p.name]


# ----------------------------------------------------------------------------- batches with nothing to learn
def test_batch_without_a_labelled_token_is_skipped_and_counted(tmp_path, capsys, word_model):
    """MLM over one-word texts at 15 %: most batches mask no token.  Such a batch is skipped (no
    forward, no NaN), counted per epoch in metrics.json and on stderr; training goes on."""
    rows = [{"text": w} for w in WORDS * 2]
    train = write_jsonl(tmp_path / "short.jsonl", rows)
    out = tmp_path / "out"
    rc, stdout, err = finetune(capsys, ["finetune", "--no-progress", "--task", "mlm", "--train", train, "--model",
                                        word_model, "--out", out, "--batch-size", 2, "--epochs", 1, "--seed", 1])
    assert rc == 0, err
    history = json.loads((out / "metrics.json").read_text())["history"]
    skipped = history[0]["skipped_batches"]
    assert 0 < skipped < 12 and f"skipped {skipped} of 12 batches with no labelled token" in err
    summary = json.loads(stdout.splitlines()[-1])
    assert summary["global_step"] == 12 and summary["train_loss"] == summary["train_loss"]  # finite, not NaN


def test_real_nan_loss_is_still_refused(tmp_path, capsys, word_model, data):
    """The NaN check stays for a real divergence: a learning rate that blows the weights up."""
    rc, _, err = finetune(capsys, args(data, word_model, tmp_path / "out", "--lr", 1e30, "--warmup-ratio", 0,
                                       save_steps=0))
    assert rc == 1 and "the loss is nan" in err and "try a lower --lr" in err, err


def test_torchrun_is_refused_in_one_line(tmp_path, capsys, data, word_model, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc, _, err = finetune(capsys, args(data, word_model, tmp_path / "out"))
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert "WORLD_SIZE=2 (torchrun)" in err and not (tmp_path / "out").exists()


def test_threads_flag_sets_and_restores(tmp_path, capsys, data, word_model, monkeypatch):
    seen = []
    run = bt._Trainer.run

    def spy(self):
        seen.append(torch.get_num_threads())
        return run(self)

    monkeypatch.setattr(bt._Trainer, "run", spy)
    before = torch.get_num_threads()
    rc, _, err = finetune(capsys, args(data, word_model, tmp_path / "out", "--threads", 3))
    assert rc == 0, err
    assert seen == [3] and torch.get_num_threads() == before


def test_progress_shows_no_loss_before_the_first(capsys):
    from bertfast.progress import Progress

    bar = Progress(10, "epoch 1/1", unit="batches", stream=sys.stderr, rates=("examples", "tokens"))
    assert "nan" not in bar._line() and "loss" not in bar._line()
    bar.loss = 0.5
    assert "loss 0.5000" in bar._line()
