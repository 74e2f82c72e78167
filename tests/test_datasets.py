"""Bundled data (docs/estimators.md §5): file checks, tiny-shakespeare, Multi30k with its cached BPE, batching, BLEU."""

import gzip
import json
import shutil

import pytest
import torch

from gradest import datasets
from gradest.datasets import (BUNDLED_FILES, PACKAGE_DATA_DIR, DataError, bleu, data_file, default_cache_dir,
                              lm_batch, load_multi30k, load_shakespeare, translation_batches)
from gradest.errors import GradestError

@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def multi30k(cache_dir):
    return load_multi30k(cache_dir=cache_dir)


@pytest.fixture
def data_copy(tmp_path):
    """A private copy of the bundled data folder, to damage."""
    return shutil.copytree(PACKAGE_DATA_DIR, tmp_path / "data")


@pytest.fixture
def bpe_trainings(monkeypatch):
    """Counts the BPE trainings done by load_multi30k (each call still trains for real)."""
    calls = []
    train_bpe = datasets._train_bpe

    def counting_train_bpe(*args, **kwargs):
        calls.append(args)
        return train_bpe(*args, **kwargs)

    monkeypatch.setattr(datasets, "_train_bpe", counting_train_bpe)
    return calls


# ---- the bundled files


def test_bundled_files_verify():
    assert sorted(path.name for path in PACKAGE_DATA_DIR.iterdir() if path.is_file()) == sorted(BUNDLED_FILES)
    for name in BUNDLED_FILES:
        assert data_file(name) == PACKAGE_DATA_DIR / name


def test_checksum_computed_once_per_file_version(data_copy, monkeypatch):
    hashed = []
    sha256 = datasets.hashlib.sha256
    monkeypatch.setattr(datasets.hashlib, "sha256", lambda content: hashed.append(1) or sha256(content))
    data_file("val.en.gz", data_copy)
    data_file("val.en.gz", data_copy)
    assert len(hashed) == 1
    (data_copy / "val.en.gz").touch()  # a file replaced after its check (new mtime) is checked again
    data_file("val.en.gz", data_copy)
    assert len(hashed) == 2


def _remove(path):
    path.unlink()


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def _flip_middle_byte(path):
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0xFF
    path.write_bytes(bytes(content))


@pytest.mark.parametrize("name, damage, problem", [
    ("tinyshakespeare.txt", _remove, "missing"),
    ("train.en.gz", _remove, "missing"),
    ("tinyshakespeare.txt", _truncate, "wrong size"),
    ("test_2016_flickr.de.gz", _truncate, "wrong size"),
    ("tinyshakespeare.txt", _flip_middle_byte, "checksum mismatch"),
    ("val.de.gz", _flip_middle_byte, "not valid gzip"),
])
def test_damaged_file_raises_data_error_naming_it(data_copy, tmp_path, name, damage, problem):
    damage(data_copy / name)
    with pytest.raises(DataError) as raised:
        if name == "tinyshakespeare.txt":
            load_shakespeare(data_dir=data_copy)
        else:
            load_multi30k(cache_dir=tmp_path / "cache", data_dir=data_copy)
    message = str(raised.value)
    assert str(data_copy / name) in message and problem in message
    assert "\n" not in message  # the CLI prints it on one line
    assert isinstance(raised.value, GradestError)


def test_en_and_de_line_counts_must_agree(data_copy, tmp_path, monkeypatch):
    # A German side one line short, registered as if it were the shipped file, so that only the pairing check can
    # catch it.
    path = data_copy / "val.de.gz"
    path.write_bytes(gzip.compress("".join(gzip.open(path, "rt", encoding="utf-8").readlines()[:-1]).encode()))
    monkeypatch.setitem(BUNDLED_FILES, "val.de.gz",
                        (path.stat().st_size, datasets.hashlib.sha256(path.read_bytes()).hexdigest()))
    with pytest.raises(DataError, match="line counts of the en and de sides differ") as raised:
        load_multi30k(cache_dir=tmp_path / "cache", data_dir=data_copy)
    assert str(path) in str(raised.value) and "1014 and 1013" in str(raised.value)


# ---- tiny-shakespeare


def test_shakespeare_split_is_fixed_and_deterministic():
    text = (PACKAGE_DATA_DIR / "tinyshakespeare.txt").read_text(encoding="utf-8")
    corpus = load_shakespeare()
    assert corpus.vocab_size == 65 and corpus.vocab == sorted(set(text))
    assert len(corpus.train) == int(len(text) * 0.9) == 1003854 and len(corpus.val) == len(text) - 1003854
    assert corpus.train.dtype == torch.long and corpus.train.dim() == 1
    assert corpus.decode(torch.cat([corpus.train, corpus.val])) == text  # first 90% train, last 10% val
    again = load_shakespeare()
    assert torch.equal(again.train, corpus.train) and torch.equal(again.val, corpus.val)
    bytes_corpus = load_shakespeare(level="byte", val_fraction=0.2)
    assert bytes_corpus.vocab_size == 256 and len(bytes_corpus.train) == int(len(text) * 0.8)
    assert bytes_corpus.decode(bytes_corpus.val) == text[int(len(text) * 0.8):]


def test_shakespeare_encode_decode_round_trip():
    for level in ("char", "byte"):
        corpus = load_shakespeare(level=level)
        text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
        assert corpus.decode(corpus.encode(text)) == text
    with pytest.raises(GradestError, match="not in the tiny-shakespeare vocabulary"):
        load_shakespeare().encode("naïve")


@pytest.mark.parametrize("kwargs", [{"level": "word"}, {"val_fraction": 0.0}, {"val_fraction": 1.0}])
def test_shakespeare_rejects_bad_arguments(kwargs):
    with pytest.raises(GradestError):
        load_shakespeare(**kwargs)


def test_lm_batch_shapes_and_reproducibility():
    tokens = load_shakespeare().train
    x, y = lm_batch(tokens, batch_size=4, block_size=16, generator=torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    generator = torch.Generator().manual_seed(1)
    assert torch.equal(lm_batch(tokens, 4, 16, generator)[0], x)
    saved = generator.get_state()  # resuming: the same generator state gives the same next batch
    following = lm_batch(tokens, 4, 16, generator)[0]
    assert torch.equal(lm_batch(tokens, 4, 16, torch.Generator().set_state(saved))[0], following)
    assert not torch.equal(following, x)
    with pytest.raises(GradestError, match="needs more than"):
        lm_batch(tokens[:16], 4, 16, generator)


# ---- Multi30k


def test_multi30k_sizes_and_special_tokens(multi30k):
    for split, size in [("train", 29000), ("val", 1014), ("test", 1000)]:
        assert len(getattr(multi30k, split)) == len(multi30k.source_text[split]) == size
        assert len(multi30k.target_text[split]) == size
    assert multi30k.vocab_size == 8000 and (multi30k.pad_id, multi30k.bos_id, multi30k.eos_id) == (0, 1, 2)
    specials = {multi30k.pad_id, multi30k.bos_id, multi30k.eos_id}
    for source, target in multi30k.train[:100] + multi30k.test[:100]:
        assert target[0] == multi30k.bos_id and target[-1] == multi30k.eos_id
        assert not specials & set(source) and not specials & set(target[1:-1])
    assert multi30k.target_text["test"][0] == "Ein Mann mit einem orangefarbenen Hut, der etwas anstarrt."


def test_multi30k_encode_decode_round_trip(multi30k):
    for split in ("val", "test"):
        for (source, target), source_text, target_text in zip(getattr(multi30k, split), multi30k.source_text[split],
                                                               multi30k.target_text[split]):
            assert multi30k.decode(target) == target_text and multi30k.decode(source) == source_text
            assert multi30k.encode(source_text) == source
    # decode reads up to the first EOS and drops padding, as a model's padded output needs
    _, target = multi30k.test[0]
    padded = torch.tensor(target + [multi30k.pad_id, 5, 6])
    assert multi30k.decode(padded) == multi30k.target_text["test"][0]


@pytest.mark.slow
def test_bpe_training_is_deterministic_and_cached(multi30k, tmp_path, bpe_trainings):
    retrained = load_multi30k(cache_dir=tmp_path)
    assert retrained.tokenizer.get_vocab() == multi30k.tokenizer.get_vocab()
    assert retrained.tokenizer.to_str() == multi30k.tokenizer.to_str()  # same merges, same everything
    assert retrained.train == multi30k.train
    assert load_multi30k(cache_dir=tmp_path).train == multi30k.train
    assert len(bpe_trainings) == 1  # the second load reused the cache


@pytest.mark.slow
def test_bpe_cache_is_reused_when_valid_and_retrained_otherwise(multi30k, tmp_path, bpe_trainings):
    # the cache's rules, not the tokenizer, are tested: a tenth of the text trains each of the six tokenizers
    # fast (the cache's record of the data is the files' hashes, whatever text is passed)
    training_text = multi30k.source_text["train"][:3000] + multi30k.target_text["train"][:3000]
    first = datasets._cached_bpe(tmp_path, 8000, training_text)
    tokenizer_file, settings_file = tmp_path / "multi30k-bpe8000.json", tmp_path / "multi30k-bpe8000.settings.json"
    assert len(bpe_trainings) == 1 and tokenizer_file.is_file() and settings_file.is_file()

    assert datasets._cached_bpe(tmp_path, 8000, training_text).to_str() == first.to_str()
    assert len(bpe_trainings) == 1  # reused

    settings = json.loads(settings_file.read_text())
    for changed in ({"min_frequency": 1}, {"tokenizers_version": "0.0.1"},
                    {"training_data_sha256": {"train.en.gz": "0" * 64}}):
        settings_file.write_text(json.dumps({**settings, **changed}))
        datasets._cached_bpe(tmp_path, 8000, training_text)
        assert json.loads(settings_file.read_text()) == settings  # retrained and rewritten
    assert len(bpe_trainings) == 4

    tokenizer_file.write_text("{not json")
    assert datasets._cached_bpe(tmp_path, 8000, training_text).to_str() == first.to_str()
    assert len(bpe_trainings) == 5

    datasets._cached_bpe(tmp_path, 8001, training_text)  # another vocabulary size is another cache entry
    assert len(bpe_trainings) == 6 and tokenizer_file.read_text() == first.to_str()


@pytest.mark.slow
def test_unwritable_cache_only_warns(multi30k, tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.warns(UserWarning, match="could not cache the BPE tokenizer"):
        data = load_multi30k(cache_dir=not_a_folder)
    assert data.train == multi30k.train


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("GRADEST_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("GRADEST_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "gradest"


def test_max_len_filters_training_pairs_only(multi30k, cache_dir, tmp_path):
    data = load_multi30k(cache_dir=cache_dir, max_len=20)
    assert 0 < len(data.train) < 29000 and len(data.val) == 1014 and len(data.test) == 1000
    assert all(len(source) <= 20 and len(target) <= 20 for source, target in data.train)
    assert data.train == [(s, t) for s, t in multi30k.train if len(s) <= 20 and len(t) <= 20]
    with pytest.raises(GradestError, match="max_len"):
        load_multi30k(cache_dir=tmp_path, max_len=2)
    with pytest.raises(GradestError, match="vocab_size"):
        load_multi30k(cache_dir=tmp_path, vocab_size=100)


def test_translation_batches(multi30k):
    pairs = multi30k.val
    batches = list(translation_batches(pairs, 64, torch.Generator().manual_seed(0), multi30k.pad_id))
    assert len(batches) == 16 and len(batches[-1][0]) == 1014 - 15 * 64
    seen = []
    for source, target_in, target_out in batches:
        assert source.dtype == target_in.dtype == torch.long and target_in.shape == target_out.shape
        assert torch.equal(target_in[:, 1:], target_out[:, :-1]) and (target_in[:, 0] == multi30k.bos_id).all()
        for row in range(len(source)):
            unpadded = source[row][source[row] != multi30k.pad_id].tolist()
            seen.append((unpadded, [multi30k.bos_id] + target_out[row][target_out[row] != multi30k.pad_id].tolist()))
    assert sorted(seen) == sorted(pairs)  # every pair exactly once, padding only at the ends
    same_seed = translation_batches(pairs, 64, torch.Generator().manual_seed(0), multi30k.pad_id)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, same_seed))
    in_order = next(translation_batches(pairs, 2, None, multi30k.pad_id))[0]
    assert in_order[0][:len(pairs[0][0])].tolist() == pairs[0][0]


def test_bleu(multi30k):
    references = multi30k.target_text["test"]
    assert bleu(references, references) == pytest.approx(100.0)
    assert bleu(references[1:] + references[:1], references) < 5.0
    with pytest.raises(GradestError, match="one hypothesis per reference"):
        bleu(references[:-1], references)
