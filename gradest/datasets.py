"""Bundled data sets (docs/estimators.md §5): tiny-shakespeare for language modelling, Multi30k En–De for translation.

The files ship inside the package (``gradest/data/``) because users have no copy of their own. Each load checks
every file it reads against the size and SHA-256 recorded in `BUNDLED_FILES`: the size on every call (one `stat`),
the checksum once per process. A missing, truncated or corrupt file raises `DataError`, whose one-line message names
the file and what is wrong with it.

Multi30k task 1 is raw text: cased, punctuation attached to words ("near many bushes."), not pre-tokenised. It is
kept exactly as it is, except that surrounding whitespace is stripped from each line (40 German training lines end in
a space). One byte-level BPE is trained jointly on the English and German training sides; BLEU is computed by
sacrebleu on the decoded (detokenised) hypotheses against the raw reference lines, with its standard 13a
tokenisation, so scores are comparable with other sacrebleu scores on the same test set, and not with the
"tokenised, lower-cased BLEU" that some Multi30k papers report.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import sacrebleu
import tokenizers
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from gradest.errors import GradestError
from gradest.io import atomic_write_text

PACKAGE_DATA_DIR = Path(__file__).with_name("data")

# File name -> (size in bytes, SHA-256). Sources: char-rnn's tiny-shakespeare; Multi30k task 1 (Elliott et al. 2016),
# train / val / test_2016_flickr, English and German.
BUNDLED_FILES: dict[str, tuple[int, str]] = {
    "tinyshakespeare.txt": (1115394, "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
    "train.en.gz": (568929, "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f"),
    "train.de.gz": (637044, "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6"),
    "val.en.gz": (21650, "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28"),
    "val.de.gz": (24681, "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a"),
    "test_2016_flickr.en.gz": (21077, "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9"),
    "test_2016_flickr.de.gz": (22890, "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8"),
}

MULTI30K_FILE_STEMS = {"train": "train", "val": "val", "test": "test_2016_flickr"}  # split -> file name stem
SOURCE_LANGUAGE, TARGET_LANGUAGE = "en", "de"
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")  # the BPE trainer gives them ids 0, 1, 2 in this order
BPE_MIN_FREQUENCY = 2  # a pair seen once is not worth a vocabulary entry
# Bump when `_train_bpe` changes how it trains, so that tokenizers cached by older code are retrained.
BPE_RECIPE_VERSION = 1

Pair = tuple[list[int], list[int]]  # (source ids, target ids with BOS ... EOS)


class DataError(GradestError):
    """A bundled data file is missing, truncated or corrupt."""


# (resolved path, size, mtime in ns) of files whose checksum matched: hashing happens once per process and file
# version, while a file replaced later (new size or mtime) is checked again.
_CHECKSUM_VERIFIED: set[tuple[str, int, int]] = set()


def data_file(name: str, data_dir: str | Path | None = None) -> Path:
    """Path of the bundled file `name` in `data_dir` (default: the package's data folder), after checking that it
    is the file gradest ships: present, of the recorded size and, once per process, of the recorded SHA-256."""
    expected_size, expected_sha256 = BUNDLED_FILES[name]
    path = Path(data_dir if data_dir is not None else PACKAGE_DATA_DIR) / name

    def fail(problem: str) -> DataError:
        return DataError(f"data file {path}: {problem}; reinstall gradest to restore it")

    try:
        stat = path.stat()
    except FileNotFoundError:
        raise fail("missing") from None
    if stat.st_size != expected_size:
        raise fail(f"wrong size ({stat.st_size} bytes, expected {expected_size}): truncated or replaced")
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _CHECKSUM_VERIFIED:
        content = path.read_bytes()
        sha256 = hashlib.sha256(content).hexdigest()
        if sha256 != expected_sha256:
            problem = f"checksum mismatch (SHA-256 {sha256[:16]}..., expected {expected_sha256[:16]}...)"
            if path.suffix == ".gz":
                problem += _gzip_problem(content)
            raise fail(problem)
        _CHECKSUM_VERIFIED.add(key)
    return path


def _gzip_problem(content: bytes) -> str:
    """'; not valid gzip (why)' when `content` does not decompress, else '' (says whether a corrupt .gz is even
    readable, which the checksum alone does not tell)."""
    try:
        gzip.decompress(content)
    except (OSError, EOFError, zlib.error) as err:
        return f"; not valid gzip ({err})"
    return ""


def _as_id_list(ids: Tensor | Sequence[int]) -> list[int]:
    return ids.tolist() if isinstance(ids, Tensor) else list(ids)


# ---------------------------------------------------------------------------------------------------------------
# tiny-shakespeare


@dataclass
class CharCorpus:
    """tiny-shakespeare as 1-D LongTensors of token ids, for character- or byte-level language modelling.

    level="char": `vocab` is the sorted set of characters of the whole text (65 of them), as in nanoGPT's
    shakespeare_char. level="byte": `vocab` has 256 entries, vocab[b] = chr(b) (the byte read as Latin-1, for
    display); the text is pure ASCII, so both levels give the same sequence and differ only in vocabulary size.
    """

    train: Tensor
    val: Tensor
    vocab: list[str]
    level: str = "char"
    _char_ids: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        self._char_ids = {char: i for i, char in enumerate(self.vocab)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        if self.level == "byte":
            return list(text.encode("utf-8"))
        try:
            return [self._char_ids[char] for char in text]
        except KeyError as err:
            raise GradestError(f"character {err.args[0]!r} is not in the tiny-shakespeare vocabulary; valid: "
                               f"{''.join(self.vocab)!r}") from None

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        ids = _as_id_list(ids)
        if self.level == "byte":
            # A model may emit a byte sequence that is not UTF-8; show it rather than fail mid-generation.
            return bytes(ids).decode("utf-8", errors="replace")
        return "".join(self.vocab[i] for i in ids)


def load_shakespeare(level: str = "char", val_fraction: float = 0.1,
                     data_dir: str | Path | None = None) -> CharCorpus:
    """tiny-shakespeare, split without shuffling: the first (1 - val_fraction) of the tokens for training, the rest
    for validation (nanoGPT's shakespeare_char split for the default 0.1). Deterministic."""
    if level not in ("char", "byte"):
        raise GradestError(f"unknown level {level!r}; valid: 'char', 'byte'")
    if not 0 < val_fraction < 1:
        raise GradestError(f"val_fraction must be strictly between 0 and 1, got {val_fraction!r}")
    text = data_file("tinyshakespeare.txt", data_dir).read_text(encoding="utf-8")
    vocab = sorted(set(text)) if level == "char" else [chr(byte) for byte in range(256)]
    empty = torch.empty(0, dtype=torch.long)
    corpus = CharCorpus(train=empty, val=empty, vocab=vocab, level=level)
    tokens = torch.tensor(corpus.encode(text), dtype=torch.long)
    n_train = int(len(tokens) * (1 - val_fraction))
    corpus.train, corpus.val = tokens[:n_train], tokens[n_train:]
    return corpus


def lm_batch(tokens: Tensor, batch_size: int, block_size: int,
             generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """`batch_size` random windows of `block_size` tokens: inputs x and next-token targets y (x shifted by one),
    both (batch_size, block_size) on tokens' device.

    Window starts are drawn from `generator` alone, so the data order is reproducible, and resumable by saving and
    restoring `generator.get_state()`. `tokens` may live on the GPU (kept there, no copy per batch) while the
    generator stays on the CPU.
    """
    if tokens.dim() != 1:
        raise GradestError(f"tokens must be a 1-D tensor, got shape {tuple(tokens.shape)}")
    if batch_size < 1 or block_size < 1:
        raise GradestError(f"batch_size and block_size must be >= 1, got {batch_size} and {block_size}")
    if len(tokens) <= block_size:
        raise GradestError(f"block_size={block_size} needs more than {block_size} tokens, got {len(tokens)}")
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator, device=generator.device)
    positions = starts[:, None] + torch.arange(block_size + 1, device=generator.device)
    windows = tokens[positions.to(tokens.device)]
    return windows[:, :-1], windows[:, 1:]


# ---------------------------------------------------------------------------------------------------------------
# Multi30k En–De


@dataclass
class TranslationData:
    """Multi30k task 1, English -> German, as BPE ids, with the raw text kept for BLEU.

    `train`, `val`, `test` hold (source ids, target ids) pairs; targets are wrapped in BOS ... EOS, sources carry no
    special tokens. `source_text[split]` / `target_text[split]` are the raw lines of each split ("train", "val",
    "test"); `target_text["test"]` are the references for `bleu`. `train` may be filtered by `max_len`; val and test
    never are (BLEU is reported on the whole standard test set).

    The tokenizer is one byte-level BPE shared by both languages: the two share the Latin alphabet and many tokens
    (names, numbers, punctuation), a joint vocabulary lets a model tie its source, target and output embeddings
    (as Vaswani et al. 2017 do for En–De), and one vocab_size sizes the whole model. Byte-level means no unknown
    token and an exact encode -> decode round trip of any text.
    """

    train: list[Pair]
    val: list[Pair]
    test: list[Pair]
    source_text: dict[str, list[str]]
    target_text: dict[str, list[str]]
    tokenizer: Tokenizer
    pad_id: int
    bos_id: int
    eos_id: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def max_length(self) -> int:
        """Longest source or target (with BOS/EOS) over all splits: the positions a model must support."""
        return max(len(ids) for split in (self.train, self.val, self.test) for pair in split for ids in pair)

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`, without special tokens (a source sentence as the model sees it)."""
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        """Text of `ids`, read up to the first EOS (a model's output after it is meaningless), PAD/BOS dropped."""
        ids = _as_id_list(ids)
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def load_multi30k(cache_dir: str | Path | None = None, vocab_size: int = 8000, max_len: int | None = None,
                  data_dir: str | Path | None = None) -> TranslationData:
    """Multi30k En–De (29,000 train, 1,014 val, 1,000 test_2016_flickr pairs) with a joint BPE of `vocab_size`
    entries trained on the training split only.

    The tokenizer is cached as tokenizer JSON in `cache_dir` (default: $GRADEST_CACHE, else
    $XDG_CACHE_HOME/gradest, else ~/.cache/gradest), beside a settings file; a cache whose settings (vocab size,
    recipe, tokenizers version, checksums of the training data) differ, or that does not load, is retrained and
    overwritten. Training is deterministic (about a second). `max_len` drops training pairs whose source or target
    (with BOS/EOS) is longer.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 256 + len(SPECIAL_TOKENS):
        raise GradestError(f"vocab_size must be an integer >= {256 + len(SPECIAL_TOKENS)} (256 bytes and "
                           f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size!r}")
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 3):
        raise GradestError(f"max_len must be None or an integer >= 3 (BOS, a token, EOS), got {max_len!r}")
    source_text, target_text = {}, {}
    for split in MULTI30K_FILE_STEMS:
        source_path = data_file(multi30k_file(split, SOURCE_LANGUAGE), data_dir)
        target_path = data_file(multi30k_file(split, TARGET_LANGUAGE), data_dir)
        source_text[split], target_text[split] = _read_lines(source_path), _read_lines(target_path)
        if len(source_text[split]) != len(target_text[split]):
            raise DataError(f"data files {source_path} and {target_path}: line counts of the en and de sides differ "
                            f"({len(source_text[split])} and {len(target_text[split])}), so they cannot be paired")

    tokenizer = _cached_bpe(Path(cache_dir) if cache_dir is not None else default_cache_dir(), vocab_size,
                            source_text["train"] + target_text["train"])
    pad_id, bos_id, eos_id = (tokenizer.token_to_id(token) for token in SPECIAL_TOKENS)

    def pairs(split: str) -> list[Pair]:
        sources = tokenizer.encode_batch(source_text[split])
        targets = tokenizer.encode_batch(target_text[split])
        return [(source.ids, [bos_id, *target.ids, eos_id]) for source, target in zip(sources, targets)]

    train = pairs("train")
    if max_len is not None:
        train = [(source, target) for source, target in train if len(source) <= max_len and len(target) <= max_len]
    return TranslationData(train=train, val=pairs("val"), test=pairs("test"), source_text=source_text,
                           target_text=target_text, tokenizer=tokenizer, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id)


def multi30k_file(split: str, language: str) -> str:
    """Bundled file name of one side of a Multi30k split, e.g. ("test", "de") -> "test_2016_flickr.de.gz"."""
    return f"{MULTI30K_FILE_STEMS[split]}.{language}.gz"


def default_cache_dir() -> Path:
    """$GRADEST_CACHE, else $XDG_CACHE_HOME/gradest, else ~/.cache/gradest."""
    if os.environ.get("GRADEST_CACHE"):
        return Path(os.environ["GRADEST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gradest"


def _read_lines(path: Path) -> list[str]:
    # Files reaching here passed their checksum, so they are valid gzip and UTF-8.
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        return [line.strip() for line in lines]


def _bpe_settings(vocab_size: int) -> dict:
    """Everything that determines the trained tokenizer; a cached one is reused only if these are equal."""
    return {
        "recipe_version": BPE_RECIPE_VERSION,
        "vocab_size": vocab_size,
        "min_frequency": BPE_MIN_FREQUENCY,
        "special_tokens": list(SPECIAL_TOKENS),
        "tokenizers_version": tokenizers.__version__,  # another version might merge differently
        "training_data_sha256": {name: BUNDLED_FILES[name][1] for name in
                                 (multi30k_file("train", SOURCE_LANGUAGE), multi30k_file("train", TARGET_LANGUAGE))},
    }


def _cached_bpe(cache_dir: Path, vocab_size: int, training_text: list[str]) -> Tokenizer:
    tokenizer_path = cache_dir / f"multi30k-bpe{vocab_size}.json"
    settings_path = cache_dir / f"multi30k-bpe{vocab_size}.settings.json"
    settings = _bpe_settings(vocab_size)
    try:
        if json.loads(settings_path.read_text(encoding="utf-8")) == settings:
            tokenizer = Tokenizer.from_str(tokenizer_path.read_text(encoding="utf-8"))
            if [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS))):
                return tokenizer
    # tokenizers reports a malformed file as a bare Exception; any unreadable cache just means "train again".
    except Exception:  # noqa: BLE001
        pass
    tokenizer = _train_bpe(vocab_size, training_text)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Tokenizer first, settings last: an interrupted write leaves settings that do not vouch for the new file.
        atomic_write_text(tokenizer_path, tokenizer.to_str())
        atomic_write_text(settings_path, json.dumps(settings, indent=1))
    except OSError as err:  # training takes a second, so a read-only cache costs little: go on without it
        warnings.warn(f"could not cache the BPE tokenizer in {cache_dir} ({err}); set GRADEST_CACHE to a writable "
                      f"folder to keep it", stacklevel=3)
    return tokenizer


def _train_bpe(vocab_size: int, training_text: list[str]) -> Tokenizer:
    """Byte-level BPE (GPT-2 style). Deterministic: the trainer sorts its initial alphabet and breaks ties between
    equally frequent pairs by token id, and no continuing-subword prefix is used (the one source of run-to-run
    differences in tokenizers' trainer, huggingface/tokenizers#1794)."""
    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space: the first word gets the same leading-space token as every other word ...
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    # ... and the decoder removes that one space again, so decode(encode(line)) == line.
    tokenizer.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(content=" ", left=1, right=0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=BPE_MIN_FREQUENCY,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(training_text, trainer, length=len(training_text))
    return tokenizer


def translation_batches(pairs: Sequence[Pair], batch_size: int, generator: torch.Generator | None,
                        pad_id: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """One epoch of padded batches (src, tgt_in, tgt_out), LongTensors of shape (batch, longest in batch).

    tgt_in = target[:-1] (BOS ...) is the decoder input, tgt_out = target[1:] (... EOS) what it must predict;
    padding is `pad_id` (use it as the loss's ignore_index). The order is a permutation drawn from `generator`
    (reproducible; resume an epoch by restoring the generator state saved at its start and skipping the batches
    done), or the given order when `generator` is None (evaluation). The last batch may be smaller.
    """
    if batch_size < 1:
        raise GradestError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(len(pairs), generator=generator).tolist() if generator is not None else range(len(pairs))
    for start in range(0, len(pairs), batch_size):
        batch = [pairs[i] for i in order[start:start + batch_size]]
        sources = pad_sequence([torch.tensor(source, dtype=torch.long) for source, _ in batch], batch_first=True,
                               padding_value=pad_id)
        targets = pad_sequence([torch.tensor(target, dtype=torch.long) for _, target in batch], batch_first=True,
                               padding_value=pad_id)
        yield sources, targets[:, :-1], targets[:, 1:]


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) of detokenised hypotheses against raw references: sacrebleu with its standard 13a
    tokenisation, one reference per sentence."""
    if len(hypotheses) != len(references) or not references:
        raise GradestError(f"bleu needs one hypothesis per reference and at least one pair, got {len(hypotheses)} "
                           f"hypotheses and {len(references)} references")
    return sacrebleu.corpus_bleu(list(hypotheses), [list(references)], tokenize="13a").score
