import numpy as np
import pytest

from hmlstm.errors import UserError
from hmlstm.model.data import (
    StreamBatcher,
    Vocabulary,
    builtin_documents,
    builtin_parts,
    builtin_text,
    decode_ptb_chars,
    is_held_out,
    load_corpus,
    looks_like_ptb_chars,
    prose_corpus,
    space_word_ends,
    strip_corpus,
    synthetic_corpus,
    text_sha256,
)


def test_builtin_corpus_is_pythons_documentation():
    text = builtin_text()
    assert len(text) > 1_500_000 and "The \"assert\" statement" in text
    keys = [k for k, _ in builtin_documents()]
    assert any(k.startswith("topic:") for k in keys) and "doc:json" in keys  # topics and docstrings
    assert "doc:json.dumps" in keys and not any(".test." in k or k.startswith("doc:test.") for k in keys)
    texts = [t for _, t in builtin_documents()]
    assert len(set(texts)) == len(texts)  # deduplicated


def test_the_builtin_documents_are_kept_in_a_cache_that_a_damaged_or_unwritable_one_never_changes(tmp_path,
                                                                                                     monkeypatch):
    """Reading the standard library's docstrings takes seconds, so their text is kept in the cache folder; a
    damaged cache file is read again from the sources, and an unwritable folder only means no cache."""
    from hmlstm.model import data

    expected = builtin_documents()
    monkeypatch.setenv("HMLSTM_CACHE_DIR", str(tmp_path / "cache"))
    data.builtin_documents.cache_clear()
    reads = []
    real = data._read_documents
    monkeypatch.setattr(data, "_read_documents", lambda *a: reads.append(1) or real(*a))

    def documents():
        data.builtin_documents.cache_clear()  # as a new process would
        return data.builtin_documents()

    try:
        assert documents() == expected and len(reads) == 1  # read from the sources, then kept
        (kept,) = (tmp_path / "cache").glob("builtin-*.json")
        assert documents() == expected and len(reads) == 1  # read from the cache
        kept.write_text('[["topic:x", "a forged document"]]')
        assert documents() == (("topic:x", "a forged document"),)  # (what a second process reads is the cache)
        monkeypatch.setattr(data, "_read_documents", lambda *a: reads.append(1) or expected)
        for damage in ('[["topic:x"', '{"a": 1}', "\udcff"):
            kept.write_text(damage, errors="surrogateescape")
            assert documents() == expected, damage  # a damaged cache is read again and replaced
            assert data._read_cached(kept) == expected
        assert len(reads) == 4
        monkeypatch.setenv("HMLSTM_CACHE_DIR", str(kept))  # a file where the folder should be
        assert documents() == expected and len(reads) == 5
    finally:
        data.builtin_documents.cache_clear()


def test_builtin_held_out_part_is_fixed_whole_documents_that_training_never_sees():
    train_text, held = builtin_parts()
    assert 0.08 < len(held) / len(builtin_text()) < 0.12
    assert builtin_text().endswith(held) and builtin_text().startswith(train_text)
    for key, text in builtin_documents():
        assert is_held_out(key) == (text in held and text not in train_text) or len(text) < 200  # short ones recur
    c = load_corpus("builtin")
    assert c.held_out == len(held) and c.held_out_start(0.5) == len(c.text) - len(held)  # the fraction is ignored
    assert c.sha256 == text_sha256(builtin_text()) == load_corpus("builtin").sha256
    s = load_corpus("builtin", strip=" \n\t")
    assert s.text[s.held_out_start(0.1):] == "".join(held.split()) and s.sha256 == c.sha256


def test_phrase_and_sentence_truths_are_punctuation_before_whitespace():
    c = prose_corpus("t", "Yes, it is. Done!\nNo:x,y e.g.so ok?")
    ends = lambda a: [c.text[i] for i in np.flatnonzero(a)]  # noqa: E731
    assert ends(c.phrase_ends) == [",", ".", "!", "?"] and ends(c.sentence_ends) == [".", "!", "?"]
    s = strip_corpus(c, " \n\t")
    assert s.text == "Yes,itis.Done!No:x,ye.g.sook?"
    assert [s.text[i] for i in np.flatnonzero(s.phrase_ends)] == [",", ".", "!", "?"]
    assert s.word_ends[s.text.index(",")] and set(s.truths()) == {"words", "phrases", "sentences"}


def test_synthetic_truth_marks_last_letter_of_each_word_and_phrase():
    c = synthetic_corpus(seed=3, n_chars=3000)
    ends = np.flatnonzero(c.word_ends)
    assert all(c.text[i].isalpha() and c.text[i + 1] in " ." for i in ends)
    assert int(c.word_ends.sum()) == len(c.text.replace(".", " ").split())
    assert np.all(c.word_ends[c.phrase_ends])  # phrase ends are word ends
    assert all(c.text[i + 1] == "." for i in np.flatnonzero(c.phrase_ends))
    assert synthetic_corpus(seed=3, n_chars=3000).text == c.text  # seeded


def test_space_word_ends():
    np.testing.assert_array_equal(space_word_ends("ab cd\ne"), [0, 1, 0, 0, 1, 0, 1])


def test_ptb_character_format():
    raw = "a _ c a t\nt h e _ d o g\n"
    assert looks_like_ptb_chars(raw) and not looks_like_ptb_chars("a cat\n")
    assert decode_ptb_chars(raw) == "a cat\nthe dog\n"


def test_vocabulary_maps_unknown_characters_to_zero():
    v = Vocabulary.from_text("abc")
    assert v.encode("abz").tolist() == [1, 2, 0]
    assert v.unknown_chars("abz!") == {"z", "!"}
    assert Vocabulary.from_json(v.to_json()).chars == v.chars


def test_batches_continue_each_stream():
    ids = np.arange(100, dtype=np.int32)
    b = StreamBatcher(ids, batch_size=2, seq_len=4)
    x0, y0 = b.batch(0)
    x1, _ = b.batch(1)
    assert x0.tolist() == [[0, 1, 2, 3], [50, 51, 52, 53]]
    assert y0.tolist() == [[1, 2, 3, 4], [51, 52, 53, 54]]
    assert x1[:, 0].tolist() == [4, 54]


@pytest.mark.parametrize("content, message", [
    (b"", "empty"), (b"  \n", "contains only whitespace"), (b"caf\xe9\n", "not UTF-8"),
])
def test_bad_corpus_files(tmp_path, content, message):
    p = tmp_path / "c.txt"
    p.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_corpus(str(p))


def test_missing_corpus(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_corpus(str(tmp_path / "nope.txt"))


def test_text_too_short_for_the_batch_shape():
    with pytest.raises(UserError, match="too short"):
        StreamBatcher(np.zeros(50, np.int32), batch_size=8, seq_len=20)


def test_a_runs_corpus_is_found_again_from_its_metadata(tmp_path):
    from hmlstm.model.data import source_of, training_part

    f = tmp_path / "t.txt"
    f.write_text("Some words here. And more words, there!\n" * 50)
    assert source_of({"corpus": f"file:{f} stripped of ' \\n\\t'"}) == str(f)  # the name of a stripped file run
    assert source_of({"corpus": "builtin:pydoc_data.topics stripped of ' '"}) == "builtin"  # older models
    assert source_of({"corpus": "something else"}) is None
    part = training_part({"source": str(f), "strip_delimiters": " \n\t", "train_config": {"val_fraction": 0.2}})
    full = load_corpus(str(f), strip=" \n\t").text
    assert part.text == full[: len(full) - int(len(full) * 0.2)]
    assert training_part({"source": str(tmp_path / "gone.txt")}) is None
