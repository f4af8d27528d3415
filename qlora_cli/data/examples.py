"""What tokenized data is: an ``Example`` (token ids and labels, and for preference data its pair) and the counts
of a tokenized dataset."""

from __future__ import annotations

from dataclasses import dataclass, field

from qlora_cli.data.sources import Row

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken; same length as input_ids
    row: Row | None = field(default=None, repr=False, compare=False)  # where it came from (eval, reports)
    fmt: str = ""
    # preference data (``data.preference``): this is the chosen response and ``rejected`` the other one, sharing
    # the prompt; or, unpaired (KTO), ``label`` says whether the response is desirable. ``prompt_len``: the tokens
    # before the response (targets are response tokens only); ``ref_logp``: the reference model's log-probability
    # of the response, when precomputed.
    rejected: Example | None = field(default=None, repr=False, compare=False)
    label: bool | None = None
    prompt_len: int = 0
    ref_logp: float | None = field(default=None, repr=False, compare=False)

    @property
    def n_targets(self) -> int:
        # Position 0 is never predicted (nothing precedes it), so it never counts as a target.
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


@dataclass
class DataStats:
    rows: int = 0
    examples: int = 0
    truncated: int = 0  # cut at sequence_len (kept if targets remain)
    dropped: int = 0  # no target token left after truncation
    tokens: int = 0
    target_tokens: int = 0

    def add(self, other: DataStats) -> None:
        for k in vars(self):
            setattr(self, k, getattr(self, k) + getattr(other, k))
