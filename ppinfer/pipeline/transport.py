"""Point-to-point transport between neighbouring stages: a fixed int64 control block,
preallocated buffers, asynchronous sends; the same code for gloo and NCCL, no pickling.

Every message on a link has one fixed size, so the receiver can post its receive before
the sender is ready (gloo then moves the bytes as soon as they are sent, instead of waiting
for a ready-to-receive round trip between two busy processes, which costs milliseconds):

- activation link (stage s -> s + 1): `[control | ids | hidden]`, sized for a decode step of
  the largest lane. The control block (`ppinfer.pipeline.wire.Control`) says what the item
  is, row by row, and every stage's busy time so far; `ids` are the item's input token ids
  [b, T] (the last stage keeps them as the repetition penalty's history). A larger payload (a
  prefill chunk) goes as a second message right after, `[ids | hidden]` bytes, into one
  receive buffer sized for the largest prefill chunk; admission records (the settings of the
  sequences an item starts) go the same way, as a control block and then their bytes;
- token link (last stage -> first): `[control | ids]`, one sampled id per row, and, only
  when some row asked for log-probabilities, their bytes right behind;
- ping: a control block alone that says "nothing to do yet" (an idle server keeps its
  receivers inside their timeouts); stop: a control block alone, forwarded down the pipe when
  all work is done.

On gloo the next receive of each link is posted as soon as the previous one completes. NCCL
serialises a peer pair's sends and receives on one stream, so there a receive is posted only
when it is awaited (a pre-posted receive from the last stage would block stage 0's own send
to it when the two are neighbours).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ppinfer.pipeline.wire import Control, LinkSizes, Msg
from ppinfer.profiling.trace import NULL_TRACER, Tracer

_SEND_BUFFERS = 4  # rotating send buffers per link; a buffer is reused 4 sends later


@dataclass
class Received:
    """One message from the previous stage. `ids` [b, T] and `hidden` [b, T, E] for an item
    ([1, N] and [1, N, E] for one with a folded chunk, see `Sequences.input_ids`),
    `payload` for an admission; the tensors are valid until the next receive."""

    control: Control
    ids: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    payload: bytes = b""


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
        self.comm_s = 0.0  # seconds spent moving data (waiting for a peer is idle time)
        prepost = dist.get_backend() == "gloo"
        self.sizes = sizes = LinkSizes.of(hidden_size, max_batch, max_tokens, dtype, world)
        last = world - 1
        self._items_in = _Inbox(rank - 1, sizes.item_bytes, device, prepost) if rank > 0 else None
        self._items_out = _Outbox(rank + 1, sizes.item_bytes, device) if rank < last else None
        self._tokens_in = _Inbox(last, sizes.token_bytes, device, prepost) if rank == 0 else None
        self._tokens_out = _Outbox(0, sizes.token_bytes, device) if rank == last else None
        # Only a stage that receives activations needs room for a prefill chunk.
        self._large_in = torch.empty(sizes.large_bytes if rank > 0 else 0, dtype=torch.uint8, device=device)
        if prepost and self._items_in is not None:
            self._items_in.post()

    def _write_control(self, buf: torch.Tensor, control: Control) -> int:
        """Write `control` at the start of `buf`; returns the byte offset after the block."""
        words = control.encode(self.world)
        buf[:len(words) * 8].view(torch.int64).copy_(torch.tensor(words, dtype=torch.int64))
        return self.sizes.control_words * 8

    def _read_control(self, buf: torch.Tensor) -> Control:
        return Control.decode(buf[:self.sizes.control_words * 8].view(torch.int64).tolist(), self.world)

    # ---- sending (asynchronous) -------------------------------------------------------------

    def send_item(self, control: Control, ids: torch.Tensor, hidden: torch.Tensor) -> None:
        """The item of `control` with its input ids [b, T] int64 and hidden [b, T, E] ([1, N]
        and [1, N, E] with a folded chunk) to the next stage: inline when it fits, else right behind."""
        assert self._items_out is not None and control.item is not None
        start = time.perf_counter()
        with self.tracer.range("send"):
            buf = self._items_out.next_buffer()
            id_bytes = ids.reshape(-1).to(torch.int64).view(torch.uint8)
            payload = hidden.reshape(-1).view(torch.uint8)
            at = self.sizes.control_words * 8
            inline = at + id_bytes.numel() + payload.numel() <= buf.numel()
            self._write_control(buf, Control(Msg.ITEM if inline else Msg.ITEM_FOLLOWS, control.item, control.busy_s))
            if inline:
                buf[at:at + id_bytes.numel()].copy_(id_bytes)
                at += id_bytes.numel()
                buf[at:at + payload.numel()].copy_(payload)
            self._items_out.send(buf)
            if not inline:
                self._items_out.send_large(torch.cat([id_bytes, payload]))
        self.comm_s += time.perf_counter() - start

    def _send_bare(self, msg: Msg) -> None:
        if self._items_out is not None:
            buf = self._items_out.next_buffer()
            self._write_control(buf, Control(msg))
            self._items_out.send(buf)

    def send_admit(self, payload: bytes) -> None:
        """Admission records (`wire.encode_admissions`) to the next stage, ahead of the item
        that starts their sequences."""
        self._send_records(Msg.ADMIT, payload)

    def send_release(self, payload: bytes) -> None:
        """Rows whose KV blocks go back to the pool (`wire.encode_release`) to the next stage,
        between the items before and after the release."""
        self._send_records(Msg.RELEASE, payload)

    def send_attach(self, payload: bytes) -> None:
        """Rows that start on cached KV blocks (`wire.encode_attach`) to the next stage, ahead of
        the items that compute them."""
        self._send_records(Msg.ATTACH, payload)

    def _send_records(self, msg: Msg, payload: bytes) -> None:
        assert self._items_out is not None
        buf = self._items_out.next_buffer()
        self._write_control(buf, Control(msg, payload=len(payload)))
        self._items_out.send(buf)
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.device)
        self._items_out.send_large(data)

    def send_stop(self) -> None:
        self._send_bare(Msg.STOP)

    def send_ping(self) -> None:
        self._send_bare(Msg.PING)

    def send_tokens(self, control: Control, tokens: torch.Tensor, extra: bytes = b"") -> None:
        """Sampled ids [b] of `control`'s item from the last stage to the first, and `extra`
        (log-probabilities, `wire.encode_logprobs`) right behind when there are any."""
        assert self._tokens_out is not None
        start = time.perf_counter()
        with self.tracer.range("send"):
            buf = self._tokens_out.next_buffer()
            at = self._write_control(buf, Control(Msg.TOKENS, control.item, control.busy_s, payload=len(extra)))
            buf[at:at + tokens.shape[0] * 8].view(torch.int64).copy_(tokens)
            self._tokens_out.send(buf)
            if extra:
                self._tokens_out.send_large(torch.frombuffer(bytearray(extra), dtype=torch.uint8).to(self.device))
        self.comm_s += time.perf_counter() - start

    def flush(self) -> None:
        """Wait for every outstanding send (before exit, so no message is lost)."""
        for box in (self._items_out, self._tokens_out):
            if box is not None:
                box.flush()

    # ---- receiving --------------------------------------------------------------------------

    def recv_item(self) -> Received:
        """The next message from the previous stage: an item with its ids and hidden states,
        admission records, or a bare STOP / PING."""
        assert self._items_in is not None
        with self.tracer.range("wait"):
            buf = self._items_in.take()
        control = self._read_control(buf)
        arrived = time.perf_counter()
        if control.msg in (Msg.ADMIT, Msg.RELEASE, Msg.ATTACH):
            payload = self._recv_large(control.payload)
            received = Received(control, payload=bytes(payload.cpu().numpy()))
        elif control.item is None:
            received = Received(control)
        else:
            item = control.item
            # [b, T] rows of T tokens; a folded item's parts one after another, [1, N]
            b, t = (len(item.rows), item.length) if item.folded is None else (1, item.tokens)
            n_ids, n_hidden = b * t * 8, b * t * self.hidden_size * (torch.finfo(self.dtype).bits // 8)
            if control.msg is Msg.ITEM:
                data = buf[self.sizes.control_words * 8:]
            else:
                data = self._recv_large(n_ids + n_hidden)
            ids = data[:n_ids].view(torch.int64).view(b, t)
            hidden = data[n_ids:n_ids + n_hidden].view(self.dtype).view(b, t, self.hidden_size)
            received = Received(control, ids, hidden)
        if self._items_in.prepost and control.msg is not Msg.STOP:  # nothing follows a stop
            self._items_in.post()
        self.comm_s += time.perf_counter() - arrived
        return received

    def _recv_large(self, nbytes: int) -> torch.Tensor:
        """The message that follows a control block, `nbytes` long. Received before the next
        control block is posted: messages from one peer match the receives in the order they
        were posted."""
        assert self._items_in is not None
        data = self._large_in[:nbytes] if nbytes <= self._large_in.numel() else torch.empty(
            nbytes, dtype=torch.uint8, device=self.device)
        with self.tracer.range("recv"):
            dist.irecv(data, self._items_in.peer).wait()
        return data

    def expect_tokens(self) -> None:
        """Rank 0: a sampling item is in flight; on gloo, post the token receive now."""
        assert self._tokens_in is not None
        if self._tokens_in.prepost:
            self._tokens_in.post()

    def recv_tokens(self) -> tuple[Control, torch.Tensor, bytes]:
        """Sampled ids [b] from the last stage (rank 0 only), and the bytes of the
        log-probabilities that follow them (empty when none do)."""
        assert self._tokens_in is not None
        with self.tracer.range("wait"):
            buf = self._tokens_in.take()
        control = self._read_control(buf)
        assert control.item is not None
        at = self.sizes.control_words * 8
        tokens = buf[at:at + len(control.item.rows) * 8].view(torch.int64).clone()
        extra = b""
        if control.payload:
            # Received before the next token receive is posted (`take` leaves none pending),
            # so this message cannot land in a buffer meant for the next ids.
            data = torch.empty(control.payload, dtype=torch.uint8, device=self.device)
            with self.tracer.range("recv"):
                dist.irecv(data, self._tokens_in.peer).wait()
            extra = bytes(data.cpu().numpy())
        return control, tokens, extra
