"""Point-to-point transport between neighbouring stages: a fixed int64 header, preallocated
receive buffers, asynchronous sends; the same code for gloo and NCCL, no pickling.

Messages:
- activation (stage s -> s + 1): header, then the hidden states `[B, T, E]` as one flat tensor;
- tokens (last stage -> first): one int64 tensor `[HEADER + max_batch]`: header then the ids;
- stop (stage s -> s + 1): a header alone, forwarded down the pipe when all work is done.

On gloo the next header receive is posted before the current item is computed, so the
transfer overlaps compute. NCCL serialises a peer pair's sends and receives on one stream, so
there a receive is posted only when it is awaited (a pre-posted receive from the last stage
would block stage 0's own send to it when the two are neighbours).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import IntEnum

import torch
import torch.distributed as dist

from ppinfer.pipeline.schedule import Kind, WorkItem
from ppinfer.profiling.trace import NULL_TRACER, Tracer

HEADER = 8
_MAX_PENDING_SENDS = 8


class Msg(IntEnum):
    ITEM = 1
    TOKENS = 2
    STOP = 3


@dataclass(frozen=True)
class Header:
    """What travels in front of every message (8 int64)."""

    msg: Msg
    item: WorkItem | None = None
    batch_size: int = 0
    finished: bool = False  # TOKENS: every sequence of the lane's batch has stopped

    def encode(self, out: torch.Tensor) -> torch.Tensor:
        it = self.item
        fields = [int(self.msg), 0, 0, 0, 0, 0, 0, self.batch_size]
        if it is not None:
            flags = int(it.samples) | int(it.reset) << 1 | int(self.finished) << 2
            fields[1:7] = [it.lane, it.batch, int(it.kind) * 1_000_000 + it.step, it.start, it.length, flags]
        out[:HEADER] = torch.tensor(fields, dtype=torch.int64)
        return out

    @classmethod
    def decode(cls, raw: list[int]) -> "Header":
        msg = Msg(raw[0])
        if msg is Msg.STOP:
            return cls(msg)
        flags = raw[6]
        kind, step = divmod(raw[3], 1_000_000)
        item = WorkItem(
            lane=raw[1], batch=raw[2], kind=Kind(kind), step=step, start=raw[4], length=raw[5],
            samples=bool(flags & 1), reset=bool(flags & 2),
        )
        return cls(msg, item, batch_size=raw[7], finished=bool(flags & 4))


@dataclass
class CommStats:
    """Seconds spent waiting for a peer (idle) and moving data (comm) on this rank."""

    idle_s: float = 0.0
    comm_s: float = 0.0


class Transport:
    """This rank's links: receive from `rank - 1`, send to `rank + 1`, and the token ring
    between the last rank and rank 0."""

    def __init__(
        self,
        rank: int,
        world: int,
        hidden_size: int,
        max_batch: int,
        max_tokens: int,
        dtype: torch.dtype,
        device: torch.device,
        tracer: Tracer = NULL_TRACER,
    ) -> None:
        self.tracer = tracer
        self.rank, self.world, self.device = rank, world, device
        self.prev, self.next, self.last = rank - 1, rank + 1, world - 1
        self.preposting = dist.get_backend() == "gloo"
        self.hidden_size = hidden_size
        self.stats = CommStats()
        self._header_in = torch.zeros(HEADER, dtype=torch.int64, device=device)
        self._hidden_in = torch.empty(max_batch * max_tokens * hidden_size, dtype=dtype, device=device)
        self._tokens_in = torch.zeros(HEADER + max_batch, dtype=torch.int64, device=device)
        self._pending_header: dist.Work | None = None
        self._sends: list[tuple[dist.Work, torch.Tensor]] = []

    # ---- sending (asynchronous; tensors are kept alive until their send completes) ----------

    def _isend(self, tensor: torch.Tensor, dst: int) -> None:
        with self.tracer.range("send"):
            self._sends.append((dist.isend(tensor, dst), tensor))
            # gloo reports completion only through wait(): retire the oldest sends (long
            # delivered by now) so the list stays bounded.
            while len(self._sends) > _MAX_PENDING_SENDS:
                self._sends.pop(0)[0].wait()

    def send_item(self, item: WorkItem, hidden: torch.Tensor) -> None:
        """hidden [B, T, E] to the next stage."""
        start = time.perf_counter()
        header = Header(Msg.ITEM, item, batch_size=hidden.shape[0]).encode(torch.empty(HEADER, dtype=torch.int64, device=self.device))
        self._isend(header, self.next)
        self._isend(hidden.contiguous().view(-1), self.next)
        self.stats.comm_s += time.perf_counter() - start

    def send_stop(self) -> None:
        if self.rank < self.last:
            self._isend(Header(Msg.STOP).encode(torch.empty(HEADER, dtype=torch.int64, device=self.device)), self.next)

    def send_tokens(self, item: WorkItem, tokens: torch.Tensor, finished: bool) -> None:
        """Sampled ids [B] from the last stage to the first."""
        start = time.perf_counter()
        msg = torch.zeros(HEADER + tokens.shape[0], dtype=torch.int64, device=self.device)
        Header(Msg.TOKENS, item, batch_size=tokens.shape[0], finished=finished).encode(msg)
        msg[HEADER:] = tokens
        self._isend(msg, 0)
        self.stats.comm_s += time.perf_counter() - start

    def flush(self) -> None:
        """Wait for every outstanding send (before exit, so no message is lost)."""
        for work, _ in self._sends:
            work.wait()
        self._sends.clear()

    # ---- receiving --------------------------------------------------------------------------

    def _post_header(self) -> None:
        self._pending_header = dist.irecv(self._header_in, self.prev)

    def recv_item(self) -> tuple[Header, torch.Tensor | None]:
        """The next activation message from the previous stage: (header, hidden [B, T, E])
        or (STOP header, None). The hidden tensor is a view of a buffer reused by the next
        receive."""
        start = time.perf_counter()
        if self._pending_header is None:
            self._post_header()
        assert self._pending_header is not None
        with self.tracer.range("wait"):
            self._pending_header.wait()
        self._pending_header = None
        header = Header.decode(self._header_in.tolist())
        got_header = time.perf_counter()
        self.stats.idle_s += got_header - start
        if header.msg is Msg.STOP:
            return header, None
        assert header.item is not None
        shape = (header.batch_size, header.item.length, self.hidden_size)
        flat = self._hidden_in[: shape[0] * shape[1] * shape[2]]
        with self.tracer.range("recv"):
            dist.irecv(flat, self.prev).wait()
        if self.preposting:
            self._post_header()
        self.stats.comm_s += time.perf_counter() - got_header
        return header, flat.view(shape)

    def recv_tokens(self, batch_size: int) -> tuple[Header, torch.Tensor]:
        """Sampled ids [B] from the last stage (rank 0 only)."""
        start = time.perf_counter()
        buf = self._tokens_in[: HEADER + batch_size]
        with self.tracer.range("wait"):
            dist.irecv(buf, self.last).wait()
        self.stats.idle_s += time.perf_counter() - start
        header = Header.decode(buf[:HEADER].tolist())
        return header, buf[HEADER:].clone()
