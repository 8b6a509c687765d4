"""Named tensors swapped to and from a folder on disk, asynchronously: ZeRO-Infinity's swapper.

ZeRO-Infinity keeps what does not fit in memory (optimizer state, parameters) in files
and streams it back just before use. The swapper gives each tensor a name and a file,
and every transfer returns a handle at once, so the disk works while the caller
computes; ``prefetch`` starts a read before the data is asked for::

    swapper = TensorSwapper("/nvme/ds_swap")
    swapper.swap_out("layer3.exp_avg", exp_avg).wait()   # before freeing or reusing exp_avg
    swapper.prefetch("layer4.exp_avg")                   # disk starts on the next one
    handle = swapper.swap_in("layer3.exp_avg", out)      # returns at once
    ...                                                   # compute meanwhile
    handle.wait()                                         # out now holds the data

Two paths, chosen per transfer:

* **Direct**: a contiguous CPU tensor whose address is a multiple of
  :data:`~ds.zero.aio.ALIGNMENT` (see :meth:`TensorSwapper.empty`) is read and written in
  place, with no copy; only its last, partial 4 KiB block goes through a small buffer.
* **Bounced**: anything else (GPU tensors, unaligned CPU tensors, a prefetch that does
  not yet know its destination) streams through a small pool of aligned, pinned buffers,
  ``buffer_bytes`` at a time; a tensor larger than the pool is pipelined through it.

Files are padded to a multiple of the alignment, so O_DIRECT never sees a partial block.
When every pool buffer is taken, the oldest write is completed first; failing that, the
most recently read piece that nobody has consumed yet is dropped and read again later.
The swapper is meant for one thread; the caller keeps a swapped-out tensor unchanged
until its handle's ``wait`` returns.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ds.zero.aio import ALIGNMENT, AioConfig, AsyncIO, OpenFile, aligned_empty, open_file, round_up
from ds.zero.swap_files import SwapFile, file_name, reserve_blocks


class SwapConfig(BaseModel):
    """The buffer pool and the I/O queue of a :class:`TensorSwapper`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    buffer_count: int = Field(default=4, ge=1)
    buffer_bytes: int = Field(default=16 << 20, ge=ALIGNMENT)
    """Size of each pool buffer; bounced transfers move this many bytes per request."""
    pin_memory: bool | None = None
    """Page-lock the pool (default: when CUDA is available)."""
    aio: AioConfig = Field(default_factory=AioConfig)

    @field_validator("buffer_bytes")
    @classmethod
    def _aligned(cls, value: int) -> int:
        if value % ALIGNMENT:
            raise ValueError(f"buffer_bytes must be a multiple of {ALIGNMENT}, got {value}")
        return value


class _Kind(Enum):
    DIRECT = "direct"  # in place in the tensor's own memory
    TAIL = "tail"  # the last partial block of a direct transfer, via a private block
    BOUNCED = "bounced"  # via a pool buffer


class _State(Enum):
    WAITING = "waiting"  # not submitted (no buffer was free, or it was dropped)
    IN_FLIGHT = "in flight"
    DONE = "done"


@dataclass(eq=False)
class _Piece:
    start: int
    nbytes: int
    kind: _Kind
    state: _State = _State.WAITING
    request: int = 0
    buffer: torch.Tensor | None = None


@dataclass(eq=False)
class _Transfer:
    name: str
    entry: SwapFile
    write: bool
    file: OpenFile
    pieces: list[_Piece]
    data: torch.Tensor | None  # uint8 view of the source (write) or destination (read)
    error: BaseException | None = None
    finished: bool = False


class SwapHandle:
    """A transfer in progress; ``wait`` finishes it and raises its error, if any."""

    def __init__(self, swapper: TensorSwapper, transfer: _Transfer) -> None:
        self._swapper = swapper
        self._transfer = transfer

    def wait(self) -> None:
        """Block until the data is on disk (swap_out) or in the destination (swap_in)."""
        self._swapper._finish(self._transfer)
        if self._transfer.error is not None:
            raise self._transfer.error

    def done(self) -> bool:
        """Whether the disk work is over (a bounced read still copies out in ``wait``)."""
        return self._transfer.finished or all(
            piece.state is _State.DONE
            or (piece.state is _State.IN_FLIGHT and self._swapper.io.done(piece.request))
            for piece in self._transfer.pieces
        )


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().reshape(-1).view(torch.uint8)


def _direct_capable(data: torch.Tensor | None) -> bool:
    return data is not None and data.device.type == "cpu" and data.data_ptr() % ALIGNMENT == 0


class TensorSwapper:
    """Writes named tensors to files under ``folder`` and reads them back, asynchronously."""

    def __init__(self, folder: str | os.PathLike[str], config: SwapConfig | None = None) -> None:
        self.config = config or SwapConfig()
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.io = AsyncIO(self.config.aio)
        self._free = [aligned_empty(self.config.buffer_bytes, pin=self.config.pin_memory)
                      for _ in range(self.config.buffer_count)]
        self._entries: dict[str, SwapFile] = {}
        self._writes: dict[str, _Transfer] = {}
        self._reads: dict[str, _Transfer] = {}
        self._write_pieces: dict[int, tuple[_Transfer, _Piece]] = {}  # by request id, oldest first
        self._held_reads: list[tuple[_Transfer, _Piece]] = []  # bounced reads holding a buffer

    # ----------------------------------------------------------------- public API

    def empty(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A CPU tensor that swaps in place (aligned address), for state that lives on disk."""
        return aligned_empty(math.prod(shape) * dtype.itemsize, pin=False).view(dtype).view(shape)

    def swap_out(self, name: str, tensor: torch.Tensor) -> SwapHandle:
        """Start writing ``tensor`` under ``name`` (replacing what was there)."""
        self._settle(name)
        data = _bytes_of(tensor.contiguous())
        path = self.folder / file_name(name)
        entry = SwapFile(path, tensor.dtype, tensor.shape, data.numel())
        self._entries[name] = entry
        file = open_file(path, write=True)
        reserve_blocks(file, round_up(entry.nbytes))
        transfer = _Transfer(name, entry, True, file, self._plan(entry.nbytes, _direct_capable(data)), data)
        self._writes[name] = transfer
        for piece in transfer.pieces:
            self._submit(transfer, piece, block=True)
        if not transfer.pieces:
            self._close(transfer)
        return SwapHandle(self, transfer)

    def prefetch(self, name: str, out: torch.Tensor | None = None) -> None:
        """Start reading ``name`` ahead of :meth:`swap_in`, into ``out`` if given (no copy then).

        Without ``out`` the data goes to pool buffers, as far as free ones reach; the rest
        is read during ``swap_in``. A write of ``name`` still in flight is finished first.
        """
        if name not in self._reads:
            self._start_read(name, out, block=False)

    def swap_in(self, name: str, out: torch.Tensor) -> SwapHandle:
        """Start reading ``name`` into ``out`` (same dtype and number of elements)."""
        transfer = self._reads.get(name)
        if transfer is None:
            transfer = self._start_read(name, out, block=False)
        else:
            self._check_out(name, out)
            data = _bytes_of(out)
            if transfer.data is None:
                transfer.data = data
            elif transfer.data.data_ptr() != data.data_ptr():
                raise ValueError(f"{name!r} was prefetched into another tensor; pass that tensor to "
                                 "swap_in, or prefetch without out=")
        return SwapHandle(self, transfer)

    def names(self) -> list[str]:
        return list(self._entries)

    def remove(self, name: str) -> None:
        """Forget ``name`` and delete its file (after its transfers finish)."""
        self._settle(name)
        self._entries.pop(name).path.unlink(missing_ok=True)

    def close(self) -> None:
        """Finish every transfer, delete the swap files and stop the I/O worker."""
        for name in list(self._entries):
            self.remove(name)
        self.io.close()

    def __enter__(self) -> TensorSwapper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ transfers

    def _entry(self, name: str) -> SwapFile:
        entry = self._entries.get(name)
        if entry is None:
            raise KeyError(f"no tensor named {name!r} was swapped out to {self.folder}; swap_out it first")
        return entry

    def _check_out(self, name: str, out: torch.Tensor) -> SwapFile:
        entry = self._entry(name)
        if out.dtype != entry.dtype or out.numel() != math.prod(entry.shape) or not out.is_contiguous():
            raise ValueError(f"{name!r} holds {entry.dtype} of shape {tuple(entry.shape)}; the destination "
                             f"is {out.dtype} of shape {tuple(out.shape)}"
                             f"{'' if out.is_contiguous() else ' and not contiguous'}; pass a matching "
                             "contiguous tensor")
        return entry

    def _start_read(self, name: str, out: torch.Tensor | None, *, block: bool) -> _Transfer:
        entry = self._check_out(name, out) if out is not None else self._entry(name)
        pending = self._writes.get(name)
        if pending is not None:
            self._finish(pending)
        if entry.error is not None:
            raise OSError(f"{name!r} cannot be read back: writing it failed ({entry.error})")
        data = _bytes_of(out) if out is not None else None
        transfer = _Transfer(name, entry, False, open_file(entry.path, write=False),
                             self._plan(entry.nbytes, _direct_capable(data)), data)
        self._reads[name] = transfer
        for piece in transfer.pieces:
            self._submit(transfer, piece, block=block)
        return transfer

    def _plan(self, nbytes: int, direct: bool) -> list[_Piece]:
        if not direct:
            step = self.config.buffer_bytes
            return [_Piece(start, min(step, nbytes - start), _Kind.BOUNCED) for start in range(0, nbytes, step)]
        body = nbytes - nbytes % ALIGNMENT
        pieces = [_Piece(0, body, _Kind.DIRECT)] if body else []
        if body < nbytes:
            pieces.append(_Piece(body, nbytes - body, _Kind.TAIL))
        return pieces

    def _submit(self, transfer: _Transfer, piece: _Piece, *, block: bool) -> None:
        """Hand ``piece`` to the I/O queue; a bounced piece without a free buffer waits."""
        if piece.kind is _Kind.DIRECT:
            assert transfer.data is not None
            address, size = transfer.data.data_ptr() + piece.start, piece.nbytes
        else:
            if piece.kind is _Kind.TAIL:
                piece.buffer = aligned_empty(ALIGNMENT, pin=False)
            else:
                piece.buffer = self._acquire(block)
                if piece.buffer is None:
                    return
            address, size = piece.buffer.data_ptr(), round_up(piece.nbytes)
            if transfer.write:
                assert transfer.data is not None
                piece.buffer[:piece.nbytes].copy_(transfer.data[piece.start:piece.start + piece.nbytes])
                piece.buffer[piece.nbytes:size].zero_()
        submit = self.io.submit_write if transfer.write else self.io.submit_read
        piece.request = submit(transfer.file, address, size, piece.start)
        piece.state = _State.IN_FLIGHT
        if transfer.write:
            self._write_pieces[piece.request] = (transfer, piece)
        elif piece.kind is _Kind.BOUNCED:
            self._held_reads.append((transfer, piece))

    def _complete(self, transfer: _Transfer, piece: _Piece) -> bool:
        """Wait for an in-flight piece; records a failure on the transfer and says if it worked."""
        piece.state = _State.DONE
        try:
            self.io.wait(piece.request)
        except OSError as exc:
            transfer.error = transfer.error or exc
            return False
        return True

    def _complete_write(self, request: int) -> None:
        transfer, piece = self._write_pieces.pop(request)
        self._complete(transfer, piece)
        self._release(piece)
        if all(p.state is _State.DONE for p in transfer.pieces):  # writes never wait for buffers
            transfer.entry.error = transfer.error
            self._close(transfer)

    def _finish(self, transfer: _Transfer) -> None:
        if transfer.finished:
            return
        if transfer.write:
            for piece in transfer.pieces:
                if piece.state is _State.IN_FLIGHT:
                    self._complete_write(piece.request)
            return
        for index, piece in enumerate(transfer.pieces):
            if transfer.error is None:
                if piece.state is _State.WAITING:
                    self._submit(transfer, piece, block=True)
                for later in transfer.pieces[index + 1:]:  # keep the disk busy while copying
                    if later.state is _State.WAITING and self._free:
                        self._submit(transfer, later, block=False)
            if piece.state is _State.IN_FLIGHT:
                self._consume(transfer, piece)
        self._close(transfer)

    def _consume(self, transfer: _Transfer, piece: _Piece) -> None:
        if piece.kind is _Kind.BOUNCED:
            self._held_reads.remove((transfer, piece))
        if self._complete(transfer, piece) and piece.buffer is not None and transfer.error is None:
            assert transfer.data is not None
            transfer.data[piece.start:piece.start + piece.nbytes].copy_(piece.buffer[:piece.nbytes])
        self._release(piece)

    def _close(self, transfer: _Transfer) -> None:
        transfer.finished = True
        transfer.file.close()
        registry = self._writes if transfer.write else self._reads
        if registry.get(transfer.name) is transfer:
            del registry[transfer.name]

    def _settle(self, name: str) -> None:
        """Before ``name`` is rewritten or removed: finish its reads and its last write."""
        read = self._reads.get(name)
        if read is not None:
            if read.data is None:  # a prefetch nobody asked for yet: drop it
                for held in [item for item in self._held_reads if item[0] is read]:
                    self._drop(*held)
                self._close(read)
            else:
                self._finish(read)
        write = self._writes.get(name)
        if write is not None:
            self._finish(write)

    # -------------------------------------------------------------------- buffers

    def _acquire(self, block: bool) -> torch.Tensor | None:
        while self._write_pieces and self.io.done(next(iter(self._write_pieces))):
            self._complete_write(next(iter(self._write_pieces)))
        while not self._free:
            if not block:
                return None
            # A buffer that is not free belongs to a write in flight or to a read piece
            # nobody has consumed yet; the caller itself never holds one while asking.
            if self._write_pieces:
                self._complete_write(next(iter(self._write_pieces)))
            else:
                self._drop(*self._held_reads[-1])  # the read needed last
        return self._free.pop()

    def _drop(self, transfer: _Transfer, piece: _Piece) -> None:
        """Give a read piece's buffer back; the piece is read again when needed."""
        self._held_reads.remove((transfer, piece))
        try:
            self.io.wait(piece.request)
        except OSError:
            pass  # the data is discarded; reading it again reports a lasting failure
        self._release(piece)
        piece.state = _State.WAITING

    def _release(self, piece: _Piece) -> None:
        if piece.kind is _Kind.BOUNCED and piece.buffer is not None:
            self._free.append(piece.buffer)
        piece.buffer = None

