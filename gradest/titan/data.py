"""The bundled tiny-shakespeare for torchtitan's trainer: a character tokenizer and a data loader in torchtitan's
interfaces (`BaseTokenizer`, `BaseDataLoader`), so that `torchtitan.train` runs offline on a machine without
torchtitan's test assets or a download.

The loader yields torchtitan's batches, ({"input": (b, L), "positions": (b, L)}, labels (b, L)): random windows of
L + 1 characters of the training split (`gradest.datasets.lm_batch`), each one document (positions 0..L-1). Every
step draws the GLOBAL batch (b x the data-parallel degree) from one generator seeded alike on every rank, and rank r
takes rows r*b..(r+1)*b-1: two ranks see together exactly what one rank sees with the same global batch. Its state
(the generator's) is saved in torchtitan's checkpoints, so a resumed run reads on where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchtitan.components.dataloader import BaseDataLoader
from torchtitan.components.tokenizer import BaseTokenizer

from gradest.datasets import lm_batch, load_shakespeare


class CharTokenizer(BaseTokenizer):
    """tiny-shakespeare's 65 characters (`gradest.datasets.load_shakespeare`)."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseTokenizer.Config):
        pass

    def __init__(self, config: Config | None = None, **kwargs):
        super().__init__()
        self.corpus = load_shakespeare()

    def encode(self, text: str, *args, **kwargs) -> list[int]:
        return self.corpus.encode(text)

    def decode(self, ids, *args, **kwargs) -> str:
        return self.corpus.decode(ids)

    def get_vocab_size(self) -> int:
        return self.corpus.vocab_size


class ShakespeareDataLoader(BaseDataLoader):
    """Random windows of tiny-shakespeare's training split (module docstring)."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseDataLoader.Config):
        dataset: str = "tiny-shakespeare"
        seed: int = 0
        """seed of the window draws (the same on every rank)"""

    def __init__(self, config: Config, *, dp_world_size: int = 1, dp_rank: int = 0, seq_len: int = 128,
                 local_batch_size: int = 8, **kwargs):
        self.tokens = load_shakespeare().train
        self.world, self.rank = dp_world_size, dp_rank
        self.seq_len, self.batch = seq_len, local_batch_size
        self.generator = torch.Generator().manual_seed(config.seed)

    def __iter__(self):
        while True:
            x, y = lm_batch(self.tokens, self.batch * self.world, self.seq_len, self.generator)
            rows = slice(self.rank * self.batch, (self.rank + 1) * self.batch)
            x, y = x[rows], y[rows]
            yield {"input": x, "positions": torch.arange(self.seq_len).expand_as(x).contiguous()}, y

    def state_dict(self) -> dict:
        return {f"generator_rank_{self.rank}": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        state = state_dict.get(f"generator_rank_{self.rank}")
        if state is not None:
            self.generator.set_state(state)
