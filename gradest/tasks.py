"""The tasks a Switch Transformer trains on (`gradest run --task`): each knows its data, builds its model and scores
a batch. `lm`: character-level tiny-shakespeare (`LanguageModelling`); `mt`: Multi30k En-De with a joint BPE and
BLEU (`Translation`). A task is built from the run's `TrainConfig` (gradest.config, which imports this module: hence
no annotation names it here).
"""

from __future__ import annotations

import dataclasses

import torch

from gradest.errors import GradestError
from gradest.model import SwitchLM, SwitchSeq2Seq, token_cross_entropy

GREEDY_MAX_LEN = 80  # tokens a translation may have in greedy decoding
DATA_SETTINGS = ("vocab_size", "pad_id")  # model settings the task's data decides


class LanguageModelling:
    """Character-level tiny-shakespeare: random windows of `block_size` characters."""

    def __init__(self, config):
        from gradest.datasets import lm_batch, load_shakespeare
        self.config, self.corpus, self.lm_batch = config, load_shakespeare(), lm_batch

    def model(self, estimator=None) -> SwitchLM:
        """The model it trains, routed by `estimator` (None: the run's, built from its config)."""
        return SwitchLM(dataclasses.replace(self.config.model, vocab_size=self.corpus.vocab_size),
                        estimator or self.config.build_estimator())

    def batch(self, split: str, generator: torch.Generator):
        tokens = self.corpus.train if split == "train" else self.corpus.val
        x, y = self.lm_batch(tokens, self.config.batch_size, self.config.model.block_size, generator)
        return x.to(self.config.device), y.to(self.config.device)

    @staticmethod
    def token_loss(model, batch, label_smoothing: float = 0.0):
        """Per-token cross-entropy (B, T) (label-smoothed if asked) and which tokens count (all of them here)."""
        logits, loss = model(*batch)
        if label_smoothing:
            loss = token_cross_entropy(logits, batch[1], -100, label_smoothing)
        return loss, torch.ones_like(loss, dtype=torch.bool)

    def final_metrics(self, model) -> dict:
        return {}


class Translation:
    """Multi30k En-De with a joint BPE; the final metrics are greedy-decoding BLEU on val and test_2016."""

    def __init__(self, config):
        from gradest.datasets import load_multi30k, translation_batches
        self.config, self.data, self.batches = config, load_multi30k(), translation_batches
        self.iterators = {}
        longest = max(max(len(src), len(tgt)) for split in (self.data.train, self.data.val, self.data.test)
                      for src, tgt in split)
        needed = max(longest, GREEDY_MAX_LEN + 1)  # greedy decoding: BOS and up to GREEDY_MAX_LEN tokens
        if config.model.block_size < needed:
            raise GradestError(f"block_size={config.model.block_size} is shorter than translation needs (the "
                               f"longest Multi30k sentence has {longest} tokens, greedy decoding writes up to "
                               f"{GREEDY_MAX_LEN + 1} positions); valid: block_size >= {needed}")

    def model(self, estimator=None) -> SwitchSeq2Seq:
        """The model it trains, routed by `estimator` (None: the run's, built from its config)."""
        cfg = dataclasses.replace(self.config.model, vocab_size=self.data.vocab_size, pad_id=self.data.pad_id)
        return SwitchSeq2Seq(cfg, estimator or self.config.build_estimator(), self.data.pad_id)

    def batch(self, split: str, generator: torch.Generator):
        pairs = self.data.train if split == "train" else self.data.val
        src, tgt_in, tgt_out = next(iter(self.batches(pairs, self.config.batch_size, generator, self.data.pad_id)))
        return src.to(self.config.device), tgt_in.to(self.config.device), tgt_out.to(self.config.device)

    def token_loss(self, model, batch, label_smoothing: float = 0.0):
        """Per-token cross-entropy (B, T) (label-smoothed if asked) and which tokens count (not the padding)."""
        logits, loss = model(*batch)
        if label_smoothing:
            loss = token_cross_entropy(logits, batch[2], self.data.pad_id, label_smoothing)
        return loss, batch[2] != self.data.pad_id

    def final_metrics(self, model) -> dict:
        from gradest.datasets import bleu
        model.eval()
        out = {}
        for split in ("val", "test"):
            pairs = getattr(self.data, split)
            hypotheses = []
            for start in range(0, len(pairs), 128):
                chunk = [src for src, _ in pairs[start:start + 128]]
                src = torch.full((len(chunk), max(map(len, chunk))), self.data.pad_id, dtype=torch.long)
                for i, ids in enumerate(chunk):
                    src[i, :len(ids)] = torch.tensor(ids)
                ids = model.greedy(src.to(self.config.device), self.data.bos_id, self.data.eos_id,
                                   max_len=GREEDY_MAX_LEN)
                hypotheses += [self.data.decode(h) for h in ids]
            out[f"bleu_{split}"] = bleu(hypotheses, self.data.target_text[split])
        return out
