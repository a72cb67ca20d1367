"""The decode rows of a step kept for the next: block tables as a grid that is patched, not rebuilt."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np

from loraplex.engine.scheduler import ScheduledChunk
from loraplex.engine.sequence import Sequence


@dataclass
class DecodeInputs:
    """A decode-only step's integer inputs, one row per request, as numpy arrays."""

    input_ids: np.ndarray  # [n] each row's last token
    positions: np.ndarray  # [n] its position (the context length before it)
    slots: np.ndarray  # [n] the KV slot its key and value go to
    tables: np.ndarray  # [n, width] block tables padded with block 0
    lora_slots: list[int]


class DecodeRows:
    """Builds a decode-only step's inputs from the last decode-only step's, touching only what changed.

    A running request's block table only grows (the scheduler appends a block when its next token
    crosses a block boundary) or is replaced by a new list (it was preempted, or finished): a row whose
    table is the same list object, of the same length, as when it was copied is copied again only if it
    moved. So a step where nobody joined, left or crossed a block copies no table at all, and one where a
    few did copies those few; the rest is a handful of passes over the batch and numpy arithmetic.
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._reset()

    def build(self, chunks: list[ScheduledChunk]) -> DecodeInputs | None:
        """The inputs when every chunk is a decode (one new token, its sequence's last, after at least one
        output token) and every position lies inside its block table; None otherwise, or if reading some
        request's state raises: the general path then builds the step, and leaves out (and reports) a
        request whose state is broken, as it reads each row's token and slot before appending it."""
        try:
            return self._build(chunks)
        except Exception:
            self._reset()  # nothing half-updated is kept
            return None

    def _reset(self) -> None:
        self._seqs: list[Sequence] = []
        self._tables: list[list[int]] = []  # held: while held, `is` on them cannot be fooled by a reused id
        self._lengths = np.zeros(0, dtype=np.int64)
        self._grid = np.zeros((0, 0), dtype=np.int64)  # [rows, capacity] zero beyond each row's length

    def _build(self, chunks: list[ScheduledChunk]) -> DecodeInputs | None:
        n = len(chunks)
        if not n or any(c.num_new_tokens != 1 for c in chunks):
            return None
        seqs = [c.seq for c in chunks]
        outputs = [s.output_token_ids for s in seqs]
        if not all(outputs):
            return None
        positions = np.fromiter((s.num_computed_tokens for s in seqs), dtype=np.int64, count=n)
        ends = (np.fromiter((len(s.prompt_token_ids) for s in seqs), dtype=np.int64, count=n)
                + np.fromiter(map(len, outputs), dtype=np.int64, count=n))
        if not np.array_equal(positions, ends - 1):
            return None
        tables = [s.block_table for s in seqs]
        lengths = np.fromiter(map(len, tables), dtype=np.int64, count=n)
        blocks = positions // self.block_size
        if not (blocks < lengths).all():
            return None
        # `token_at`, as the general path reads a row's token (a request whose state is broken raises here).
        input_ids = np.array([s.token_at(p) for s, p in zip(seqs, positions.tolist(), strict=True)], dtype=np.int64)
        grid = self._carry(seqs, tables, lengths)
        bs = self.block_size
        slots = grid[np.arange(n), blocks] * bs + positions % bs
        return DecodeInputs(input_ids, positions, slots, grid[:, :int(lengths.max())],
                            [s.lora_slot for s in seqs])

    def _carry(self, seqs: list[Sequence], tables: list[list[int]], lengths: np.ndarray) -> np.ndarray:
        """This step's grid: the last one's rows where the same tables come back, patched where they grew."""
        n = len(seqs)
        old_tables, old_lengths = self._tables, self._lengths
        width = int(lengths.max())
        if len(self._seqs) == n and all(map(operator.is_, seqs, self._seqs)):
            grid = self._grid
            if grid.shape[1] < width:
                grid = np.pad(grid, ((0, 0), (0, width + 8 - grid.shape[1])))
            carried = [t is old for t, old in zip(tables, old_tables, strict=True)]
            start = old_lengths.copy()
        else:
            where = {id(s): i for i, s in enumerate(self._seqs)}
            source = [where.get(id(s), -1) for s in seqs]
            carried = [i >= 0 and t is old_tables[i] for t, i in zip(tables, source, strict=True)]
            grid = np.zeros((n, max(width + 8, self._grid.shape[1])), dtype=np.int64)
            start = np.zeros(n, dtype=np.int64)
            rows = [j for j, c in enumerate(carried) if c]
            if rows:
                frm = [source[j] for j in rows]
                old_width = self._grid.shape[1]
                grid[rows, :old_width] = self._grid[frm]
                start[rows] = old_lengths[frm]
        # Rows to (re)write from `start` on: a table that is new to its row, or grew since it was copied.
        stale = np.flatnonzero(~np.fromiter(carried, dtype=bool, count=n) | (start != lengths))
        for j in stale.tolist():
            a = int(start[j])
            if not carried[j] or a > lengths[j]:  # (a table never shrinks while it is the same list)
                grid[j].fill(0)
                a = 0
            grid[j, a:lengths[j]] = tables[j][a:]
        self._seqs, self._tables, self._lengths, self._grid = seqs, tables, lengths, grid
        return grid
