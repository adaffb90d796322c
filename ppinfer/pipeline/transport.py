"""Point-to-point transport between neighbouring stages: a fixed int64 header, preallocated
buffers, asynchronous sends; the same code for gloo and NCCL, no pickling.

Every message on a link has one fixed size, so the receiver can post its receive before
the sender is ready (gloo then moves the bytes as soon as they are sent, instead of waiting
for a ready-to-receive round trip between two busy processes, which costs milliseconds):

- activation link (stage s -> s + 1): `[header | hidden]` bytes, sized for a decode step of
  the largest lane (`max_batch x 1 x E`). A larger payload (a prefill chunk) goes as a second
  message right after, announced by the header, into one receive buffer sized for the largest
  prefill chunk of the largest lane (`max_batch x max_tokens x E`);
- token link (last stage -> first): `[header | ids]` int64, sized for the largest lane;
- stop: a header alone on the activation link, forwarded down the pipe when all work is done.

On gloo the next receive of each link is posted as soon as the previous one completes. NCCL
serialises a peer pair's sends and receives on one stream, so there a receive is posted only
when it is awaited (a pre-posted receive from the last stage would block stage 0's own send
to it when the two are neighbours).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import IntEnum

import torch
import torch.distributed as dist

from ppinfer.pipeline.schedule import Kind, WorkItem
from ppinfer.profiling.trace import NULL_TRACER, Tracer

HEADER = 8  # int64 fields
HEADER_BYTES = HEADER * 8
_SEND_BUFFERS = 4  # rotating send buffers per link; a buffer is reused 4 sends later


class Msg(IntEnum):
    ITEM = 1  # hidden states inline
    ITEM_FOLLOWS = 2  # hidden states in the next message
    TOKENS = 3
    STOP = 4


@dataclass(frozen=True)
class Header:
    """What travels in front of every message (8 int64)."""

    msg: Msg
    item: WorkItem | None = None
    batch_size: int = 0
    finished: bool = False  # TOKENS: every sequence of the lane's batch has stopped

    def encode(self) -> list[int]:
        fields = [int(self.msg), 0, 0, 0, 0, 0, 0, self.batch_size]
        it = self.item
        if it is not None:
            flags = int(it.samples) | int(it.reset) << 1 | int(self.finished) << 2
            fields[1:7] = [it.lane, it.batch, int(it.kind) * 1_000_000 + it.step, it.start, it.length, flags]
        return fields

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
    """Seconds spent moving data on this rank (waiting for a peer is idle time, which the
    runtime derives as wall - compute - comm)."""

    comm_s: float = 0.0


class _Inbox:
    """Fixed-size receives from one peer, double-buffered: one buffer is read by the caller
    while the next receive (pre-posted on gloo) fills the other."""

    def __init__(self, peer: int, nbytes: int, device: torch.device, prepost: bool) -> None:
        self.peer, self.prepost = peer, prepost
        self.buffers = [torch.zeros(nbytes, dtype=torch.uint8, device=device) for _ in range(2)]
        self.turn = 0
        self.pending: dist.Work | None = None

    def post(self) -> None:
        if self.pending is None:
            self.pending = dist.irecv(self.buffers[self.turn], self.peer)

    def take(self) -> torch.Tensor:
        """Wait for the next message; returns its buffer (valid until the next take)."""
        self.post()
        assert self.pending is not None
        self.pending.wait()
        self.pending = None
        buf = self.buffers[self.turn]
        self.turn ^= 1
        return buf


class _Outbox:
    """Rotating fixed-size send buffers to one peer; sends are asynchronous."""

    def __init__(self, peer: int, nbytes: int, device: torch.device) -> None:
        self.peer = peer
        self.buffers = [torch.zeros(nbytes, dtype=torch.uint8, device=device) for _ in range(_SEND_BUFFERS)]
        self.works: list[dist.Work | None] = [None] * _SEND_BUFFERS
        self.turn = 0
        self.extra: list[tuple[dist.Work, torch.Tensor]] = []  # large payloads in flight

    def next_buffer(self) -> torch.Tensor:
        work = self.works[self.turn]
        if work is not None:
            work.wait()  # sent long ago; gloo reports completion only through wait()
        return self.buffers[self.turn]

    def send(self, buf: torch.Tensor) -> None:
        self.works[self.turn] = dist.isend(buf, self.peer)
        self.turn = (self.turn + 1) % _SEND_BUFFERS

    def send_large(self, tensor: torch.Tensor) -> None:
        while len(self.extra) >= _SEND_BUFFERS:
            self.extra.pop(0)[0].wait()
        self.extra.append((dist.isend(tensor, self.peer), tensor))

    def flush(self) -> None:
        for work in self.works:
            if work is not None:
                work.wait()
        for work, _ in self.extra:
            work.wait()
        self.works = [None] * _SEND_BUFFERS
        self.extra.clear()


@dataclass(frozen=True)
class LinkSizes:
    """What a rank preallocates per link, from the largest messages the run can send."""

    item_bytes: int  # header + a decode step of the largest lane inline
    token_bytes: int  # header + one sampled id per sequence of the largest lane
    large_elements: int  # the largest prefill chunk of the largest lane: B x T x E values

    @classmethod
    def of(cls, hidden_size: int, max_batch: int, max_tokens: int, dtype: torch.dtype) -> "LinkSizes":
        """`max_batch`: sequences in the fullest lane; `max_tokens`: tokens per sequence in
        the longest prefill chunk actually issued (not the configured chunk, which may be far
        longer than every prompt)."""
        esize = torch.finfo(dtype).bits // 8
        return cls(
            item_bytes=HEADER_BYTES + max_batch * hidden_size * esize,
            token_bytes=(HEADER + max_batch) * 8,
            large_elements=max_batch * max_tokens * hidden_size,
        )


def _write_header(buf: torch.Tensor, header: Header) -> None:
    buf[:HEADER_BYTES].view(torch.int64).copy_(torch.tensor(header.encode(), dtype=torch.int64))


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
        self.rank, self.world, self.device, self.tracer = rank, world, device, tracer
        self.hidden_size, self.dtype = hidden_size, dtype
        self.stats = CommStats()
        prepost = dist.get_backend() == "gloo"
        sizes = LinkSizes.of(hidden_size, max_batch, max_tokens, dtype)
        last = world - 1
        self._items_in = _Inbox(rank - 1, sizes.item_bytes, device, prepost) if rank > 0 else None
        self._items_out = _Outbox(rank + 1, sizes.item_bytes, device) if rank < last else None
        self._tokens_in = _Inbox(last, sizes.token_bytes, device, prepost) if rank == 0 else None
        self._tokens_out = _Outbox(0, sizes.token_bytes, device) if rank == last else None
        # Only a stage that receives activations needs room for a prefill chunk.
        self._large_in = torch.empty(sizes.large_elements if rank > 0 else 0, dtype=dtype, device=device)
        if prepost and self._items_in is not None:
            self._items_in.post()

    # ---- sending (asynchronous) -------------------------------------------------------------

    def send_item(self, item: WorkItem, hidden: torch.Tensor) -> None:
        """hidden [B, T, E] to the next stage: inline when it fits, else right behind."""
        assert self._items_out is not None
        start = time.perf_counter()
        with self.tracer.range("send"):
            buf = self._items_out.next_buffer()
            payload = hidden.reshape(-1).view(torch.uint8)
            inline = HEADER_BYTES + payload.numel() <= buf.numel()
            _write_header(buf, Header(Msg.ITEM if inline else Msg.ITEM_FOLLOWS, item, batch_size=hidden.shape[0]))
            if inline:
                buf[HEADER_BYTES:HEADER_BYTES + payload.numel()].copy_(payload)
            self._items_out.send(buf)
            if not inline:
                self._items_out.send_large(hidden.contiguous().view(-1))
        self.stats.comm_s += time.perf_counter() - start

    def send_stop(self) -> None:
        if self._items_out is not None:
            buf = self._items_out.next_buffer()
            _write_header(buf, Header(Msg.STOP))
            self._items_out.send(buf)

    def send_tokens(self, item: WorkItem, tokens: torch.Tensor, finished: bool) -> None:
        """Sampled ids [B] from the last stage to the first."""
        assert self._tokens_out is not None
        start = time.perf_counter()
        with self.tracer.range("send"):
            buf = self._tokens_out.next_buffer()
            _write_header(buf, Header(Msg.TOKENS, item, batch_size=tokens.shape[0], finished=finished))
            buf.view(torch.int64)[HEADER:HEADER + tokens.shape[0]].copy_(tokens)
            self._tokens_out.send(buf)
        self.stats.comm_s += time.perf_counter() - start

    def flush(self) -> None:
        """Wait for every outstanding send (before exit, so no message is lost)."""
        for box in (self._items_out, self._tokens_out):
            if box is not None:
                box.flush()

    # ---- receiving --------------------------------------------------------------------------

    def recv_item(self) -> tuple[Header, torch.Tensor | None]:
        """The next activation message from the previous stage: (header, hidden [B, T, E])
        or (STOP header, None). The hidden tensor is only valid until the next receive."""
        assert self._items_in is not None
        with self.tracer.range("wait"):
            buf = self._items_in.take()
        header = Header.decode(buf[:HEADER_BYTES].view(torch.int64).tolist())
        arrived = time.perf_counter()
        if header.msg is Msg.STOP:
            return header, None
        assert header.item is not None
        shape = (header.batch_size, header.item.length, self.hidden_size)
        n = shape[0] * shape[1] * shape[2]
        if header.msg is Msg.ITEM:
            esize = torch.finfo(self.dtype).bits // 8
            hidden = buf[HEADER_BYTES:HEADER_BYTES + n * esize].view(self.dtype)
        else:
            # Received before the next header is posted: messages from one peer match the
            # receives in the order they were posted.
            hidden = self._large_in[:n]
            with self.tracer.range("recv"):
                dist.irecv(hidden, self._items_in.peer).wait()
        if self._items_in.prepost:
            self._items_in.post()
        self.stats.comm_s += time.perf_counter() - arrived
        return header, hidden.view(shape)

    def expect_tokens(self) -> None:
        """Rank 0: a sampling item is in flight; on gloo, post the token receive now."""
        assert self._tokens_in is not None
        if self._tokens_in.prepost:
            self._tokens_in.post()

    def recv_tokens(self) -> tuple[Header, torch.Tensor]:
        """Sampled ids [B] from the last stage (rank 0 only)."""
        assert self._tokens_in is not None
        with self.tracer.range("wait"):
            buf = self._tokens_in.take().view(torch.int64)
        header = Header.decode(buf[:HEADER].tolist())
        return header, buf[HEADER:HEADER + header.batch_size].clone()
