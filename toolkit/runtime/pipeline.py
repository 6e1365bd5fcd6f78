"""Image files to engine-ready batches, prepared in the background while the engine runs the previous batch.

On a CUDA device: a reader thread reads each file's bytes straight into pinned host memory and reads its JPEG
header; a device thread decodes the JPEGs of a batch together on the GPU (``torchvision.io.decode_jpeg``,
nvJPEG), applies the EXIF orientation, and resizes, pads and scales them on the GPU exactly as the model's
:class:`~toolkit.signature.PreprocessSpec` says, all on a second CUDA stream. Each batch is handed over with a
CUDA event that the consumer's stream waits on (and ``record_stream`` for the allocator), so the decode of the
next batches (``prefetch`` of them) overlaps the inference of this one. PNG, GIF, BMP, CMYK or lossless JPEGs
are decoded on the CPU with :func:`~toolkit.runtime.preprocessing.read_image` and uploaded; a batch that nvJPEG
refuses is decoded on the CPU file by file, which names the broken files with the same message as
``read_image``.

On the CPU: one thread runs ``read_image`` + ``preprocess_one`` ahead of the consumer, so the batches are
bitwise those of :func:`~toolkit.runtime.preprocessing.preprocess`.

Broken files are left out of the batches and collected in :attr:`ImagePipeline.bad` (file -> why, in input
order); batches hold ``batch_size`` readable images each (the last may hold fewer), whatever was left out.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..errors import InputError
from ..signature import PreprocessSpec
from .jpeg_header import orient, parse_jpeg_header
from .preprocessing import preprocess_one, read_image, resize_normalize

_DONE = object()


@dataclass
class PipelineBatch:
    index: int
    paths: list[Path]  # the readable files of this batch, in input order
    images: torch.Tensor  # [n,3,H,W] float32 on the device, as preprocess() makes them
    sizes: torch.Tensor  # [n,2] (w, h) of each image as displayed, on the device


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Regroup:
    """Collects prepared chunks (some files left out) into batches of exactly ``size`` images."""

    def __init__(self, size: int) -> None:
        self.size, self.paths, self.images, self.sizes = size, [], [], []

    def add(self, paths: list[Path], images: torch.Tensor, sizes: torch.Tensor) -> list[tuple[list[Path], torch.Tensor, torch.Tensor]]:
        if paths:
            self.paths += paths
            self.images.append(images)
            self.sizes.append(sizes)
        out = []
        while len(self.paths) >= self.size:
            out.append(self._take(self.size))
        return out

    def flush(self) -> list[tuple[list[Path], torch.Tensor, torch.Tensor]]:
        return [self._take(len(self.paths))] if self.paths else []

    def _take(self, n: int) -> tuple[list[Path], torch.Tensor, torch.Tensor]:
        images = self.images[0] if len(self.images) == 1 else torch.cat(self.images)
        sizes = self.sizes[0] if len(self.sizes) == 1 else torch.cat(self.sizes)
        paths, self.paths = self.paths[:n], self.paths[n:]
        self.images, self.sizes = ([images[n:]], [sizes[n:]]) if self.paths else ([], [])
        return paths, images[:n], sizes[:n]


@dataclass
class _Entry:
    path: Path
    kind: str  # "jpeg" (bytes for the GPU decoder), "image" (decoded on the CPU), "bad"
    payload: Any = None  # pinned uint8 bytes, a uint8 [3,H,W] image, or the InputError text
    orientation: int = 1


class ImagePipeline:
    """Iterate over :class:`PipelineBatch` es of ``paths`` (once); see the module docstring."""

    def __init__(self, paths: Sequence[str | Path], spec: PreprocessSpec, batch_size: int, device: str | torch.device = "cpu",
                 *, sizes_dtype: torch.dtype = torch.int64, prefetch: int = 2, gpu_decode: bool | None = None) -> None:
        """``gpu_decode``: decode JPEGs in batches with ``decode_jpeg`` on ``device`` (None: where it is CUDA). True with
        the CPU runs that same code (header routing, batched decode, EXIF, grouped resize) without streams."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch size must be a positive integer, got {batch_size!r}")
        self.paths = [Path(p) for p in paths]
        self.spec, self.batch_size, self.sizes_dtype = spec, batch_size, sizes_dtype
        self.device = torch.device(device)
        self.prefetch = max(1, int(prefetch))
        self.gpu_decode = self.device.type == "cuda" if gpu_decode is None else bool(gpu_decode)
        self._cuda = self.gpu_decode and self.device.type == "cuda"  # streams and events
        self._bad: dict[Path, tuple[int, str]] = {}
        self._stop = threading.Event()
        self._started = False
        self._no_nvjpeg = False
        self.decode_events: list[tuple[Any, Any]] = []  # CUDA: (start, end) of each chunk's decode + preprocess, side stream
        self.infer_events: list[tuple[Any, Any]] = []  # CUDA: (handed over, next batch asked for) on the consumer's stream

    @property
    def bad(self) -> dict[Path, str]:
        """Files that cannot be read -> why (the ``read_image`` message), in input order."""
        return {p: why for p, (_, why) in sorted(self._bad.items(), key=lambda kv: kv[1][0])}

    def _chunks(self) -> Iterator[tuple[int, list[Path]]]:
        for i in range(0, len(self.paths), self.batch_size):
            yield i, self.paths[i:i + self.batch_size]

    def _put(self, q: queue.Queue, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _items(self, q: queue.Queue) -> Iterator[Any]:
        """What a producer thread puts on ``q``, until it is done (or the pipeline stops); its failure is raised here."""
        while True:
            try:
                item = q.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item

    def _guard(self, out: queue.Queue, work: Any) -> None:
        try:
            work()
        except BaseException as e:  # handed to the consumer, raised there
            self._put(out, _Failure(e))
        else:
            self._put(out, _DONE)

    # --- the CPU path -------------------------------------------------------------------------------------------

    def _cpu_work(self, out: queue.Queue) -> None:
        regroup = _Regroup(self.batch_size)
        for start, chunk in self._chunks():
            paths, images, sizes = [], [], []
            for k, p in enumerate(chunk):
                if self._stop.is_set():
                    return
                try:
                    img, wh = preprocess_one(read_image(p), self.spec)
                except InputError as e:
                    self._bad[p] = (start + k, str(e))
                    continue
                paths.append(p)
                images.append(img)
                sizes.append(wh)
            stacked = torch.stack(images) if images else None
            for batch in regroup.add(paths, stacked, torch.tensor(sizes, dtype=self.sizes_dtype)):
                if not self._put(out, batch):
                    return
        for batch in regroup.flush():
            self._put(out, batch)

    # --- the GPU path -------------------------------------------------------------------------------------------

    def _read(self, p: Path) -> _Entry:
        """The file's bytes in pinned memory when the GPU decodes it; else decoded here on the CPU."""
        try:
            size = p.stat().st_size
            if p.is_file() and size > 4:
                buf = torch.empty(size, dtype=torch.uint8, pin_memory=self._cuda)
                with open(p, "rb") as f:
                    got = f.readinto(memoryview(buf.numpy()))
                if got == size:
                    header = parse_jpeg_header(memoryview(buf.numpy()))
                    if header.gpu_decodable:
                        return _Entry(p, "jpeg", buf, header.orientation)
        except OSError:
            pass  # read_image below says why, as the CPU path does
        try:
            return _Entry(p, "image", self._pin(read_image(p)))
        except InputError as e:
            return _Entry(p, "bad", str(e))

    def _pin(self, t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory() if self._cuda else t

    def _reader_work(self, out: queue.Queue) -> None:
        for start, chunk in self._chunks():
            entries = []
            for p in chunk:
                if self._stop.is_set():
                    return
                entries.append(self._read(p))
            if not self._put(out, (start, entries)):
                return

    def _decode(self, entries: list[_Entry]) -> list[torch.Tensor | None]:
        """uint8 [3,H,W] images on the device as displayed (None where the file is broken)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        out: list[torch.Tensor | None] = [None] * len(entries)
        jpegs = [i for i, e in enumerate(entries) if e.kind == "jpeg"]
        decoded = None
        if jpegs and not self._no_nvjpeg:
            try:
                decoded = decode_jpeg([entries[i].payload for i in jpegs], mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError as e:  # nvJPEG refused one of them: the CPU decoder names the broken ones
                decoded = None
                if "not compiled with nvJPEG" in str(e):  # this torchvision has no GPU decoder: the CPU from now on
                    self._no_nvjpeg = True
        for k, i in enumerate(jpegs):
            e = entries[i]
            if decoded is not None:
                out[i] = orient(decoded[k], e.orientation)
                continue
            try:
                entries[i] = _Entry(e.path, "image", self._pin(read_image(e.path)))
            except InputError as err:
                entries[i] = _Entry(e.path, "bad", str(err))
        for i, e in enumerate(entries):
            if e.kind == "image":
                out[i] = e.payload.to(self.device, non_blocking=self._cuda)
        return out

    def _prepare(self, images: list[torch.Tensor]) -> torch.Tensor:
        """One resize per distinct image size; the batch in input order."""
        groups: dict[tuple[int, int], list[int]] = {}
        for k, img in enumerate(images):
            groups.setdefault(tuple(img.shape[-2:]), []).append(k)
        if len(groups) == 1:
            return resize_normalize(torch.stack(images), self.spec)
        prepared: list[Any] = [None] * len(images)
        for members in groups.values():
            for k, t in zip(members, resize_normalize(torch.stack([images[k] for k in members]), self.spec)):
                prepared[k] = t
        return torch.stack(prepared)

    def _device_work(self, inbox: queue.Queue, out: queue.Queue, stream: Any) -> None:
        regroup = _Regroup(self.batch_size)
        with contextlib.ExitStack() as ctx:
            if self._cuda:
                ctx.enter_context(torch.cuda.device(self.device))
                ctx.enter_context(torch.cuda.stream(stream))
            for start, entries in self._items(inbox):
                if self._cuda:
                    began, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    began.record(stream)
                images = self._decode(entries)
                for k, (e, img) in enumerate(zip(entries, images)):
                    if img is None:
                        self._bad[e.path] = (start + k, str(e.payload))
                good = [(e.path, img) for e, img in zip(entries, images) if img is not None]
                stacked = self._prepare([img for _, img in good]) if good else None
                wh = [(int(img.shape[-1]), int(img.shape[-2])) for _, img in good]
                sizes = self._pin(torch.tensor(wh, dtype=self.sizes_dtype).reshape(-1, 2)).to(self.device, non_blocking=self._cuda)
                if self._cuda:
                    ended.record(stream)
                    self.decode_events.append((began, ended))
                for paths, imgs, szs in regroup.add([p for p, _ in good], stacked, sizes):
                    if not self._handover(out, stream, paths, imgs, szs):
                        return
            for paths, imgs, szs in regroup.flush():
                self._handover(out, stream, paths, imgs, szs)

    def _handover(self, out: queue.Queue, stream: Any, paths: list[Path], images: torch.Tensor, sizes: torch.Tensor) -> bool:
        ready = None
        if self._cuda:
            ready = torch.cuda.Event()
            ready.record(stream)
        return self._put(out, (paths, images, sizes, ready))

    # --- the consumer ---------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[PipelineBatch]:
        if self._started:
            raise RuntimeError("an ImagePipeline is iterated once")
        self._started = True
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        threads = []
        if self.gpu_decode:
            stream = torch.cuda.Stream(device=self.device) if self._cuda else None
            inbox: queue.Queue = queue.Queue(maxsize=self.prefetch)
            threads.append(threading.Thread(target=self._guard, args=(inbox, lambda: self._reader_work(inbox)), daemon=True))
            threads.append(threading.Thread(target=self._guard, args=(out, lambda: self._device_work(inbox, out, stream)), daemon=True))
        else:
            threads.append(threading.Thread(target=self._guard, args=(out, lambda: self._cpu_work(out)), daemon=True))
        for t in threads:
            t.start()
        try:
            for index, item in enumerate(self._items(out)):
                if self._cuda:
                    paths, images, sizes, ready = item
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(ready)
                    images.record_stream(current)  # made on the side stream, used on this one: not reused too early
                    sizes.record_stream(current)
                    handed = torch.cuda.Event(enable_timing=True)
                    handed.record(current)
                else:
                    paths, images, sizes = item[:3]
                    images, sizes = images.to(self.device), sizes.to(self.device)
                yield PipelineBatch(index, paths, images, sizes)
                if self._cuda:
                    released = torch.cuda.Event(enable_timing=True)
                    released.record(current)
                    self.infer_events.append((handed, released))
        finally:
            self._stop.set()
            for t in threads:
                t.join(timeout=30)

    def overlapped_decodes(self) -> int:
        """CUDA: how many chunks were decoded (on the GPU) while the consumer's stream ran another batch's work."""
        if not self._cuda or not self.decode_events or not self.infer_events:
            return 0
        torch.cuda.synchronize(self.device)
        base = self.decode_events[0][0]
        infer = [(base.elapsed_time(h), base.elapsed_time(r)) for h, r in self.infer_events]
        count = 0
        for k, (s, e) in enumerate(self.decode_events):
            s_ms, e_ms = base.elapsed_time(s), base.elapsed_time(e)
            count += any(i != k and s_ms < r and e_ms > h for i, (h, r) in enumerate(infer))
        return count
