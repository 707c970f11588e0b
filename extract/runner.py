"""Stage 1: run one frozen teacher over every (image, view) and write its tokens to the store, in
(view slot, image shard) blocks: each rank (torchrun) owns the image shards ``shard % world_size ==
rank``, a killed run resumes by skipping complete blocks, and a batch holds consecutive images of
one block, so a block's tokens do not depend on the ranks. A decode thread (on CUDA it also pins
each batch and copies it on its own stream), the teacher forward and a writer thread overlap.
Locks, view pixels and the teachers' input: docs/running.md, section 3; docs/format.md."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from tqdm import tqdm

from core import dist
from core.io import write_atomic
from core.log import command_line, log_line, open_log
from core.precision import resolve_amp
from extract.config import ExtractConfig, config_path
from store import codecs
from data import views as V
from data.decode import make_decoder
from data.decode.stored import pil_stored_views
from store.features import PIXELS, TEACHER_INPUTS, DataInfo, FeatureStore, StoreError, TeacherStore, teacher_input
from store.lock import StoreLocked, WriterLock
from core.preempt import PreemptSignals
from core.prefetch import DeviceCopier, Prefetch
from core.progress import progress_bar
from extract.teacher import teacher_config
from teachers.descriptors import descriptor, register
from store.viewpixels import ViewPixels, jpeg_round_trip, uint8_views


@dataclass
class ViewBatch:
    """Decoded views of consecutive images of one block.

    index (B,) int64; view (B,) int64; boxes (B, 4) int64; flips (B,) bool;
    visible (B, n_k) int64; images (B, 3, 224, 224) float32 normalised, the teacher's input
    (None once the batch was handed to the device: ``Extractor.stream``); pixels
    (B, 224, 224, 3) uint8, the same views before normalising, when the block's view pixels are
    to be stored; encoded, the views as the store holds them (JPEG bytes) when the teacher's
    input is the decoded stored view (``Extractor.teacher_input == "jpeg"``).
    """
    index: np.ndarray
    view: np.ndarray
    boxes: np.ndarray
    flips: np.ndarray
    visible: np.ndarray
    images: torch.Tensor | None
    pixels: np.ndarray | None = None
    encoded: list[bytes] | None = None


class Extractor:
    """Decode views, run the teacher on its visible patches, return (B, T, C) tokens (C its width).

    ``decoder_settings``: the hardware decoder's settings for ``make_decoder``;
    ``prefetch``: batches the decode thread may run ahead of the teacher;
    ``teacher_input``: ``source`` runs the teacher on the decoded crops; ``jpeg`` on the
    views the store keeps (``encode_view``), decoded by PIL as training's reference decoder
    does, so a student reading the stored views sees the teacher's pixels up to decoder rounding.
    ``amp``: the teacher's precision, a setting of core/precision.py resolved on ``device`` (the
    CPU runs fp32) and set on the teacher (``Teacher.set_amp``); None runs the teacher as built."""

    def __init__(self, teacher, data, *, seed: int, views: int, batch_size: int, device: str,
                 decoder: str = "auto", num_threads: int = 2, decoder_settings: dict | None = None,
                 prefetch: int = 2, teacher_input: str = "source", amp: str | None = None):
        if teacher_input not in TEACHER_INPUTS:
            raise ValueError(f"teacher_input={teacher_input!r}: choose one of {TEACHER_INPUTS}")
        self.teacher, self.teacher_input = teacher, teacher_input
        self.data = data
        self.seed, self.views, self.batch_size = seed, views, batch_size
        self.device = torch.device(device)
        self.decode = make_decoder(decoder, batch_size=batch_size, device=device, num_threads=num_threads,
                                   **(decoder_settings or {}))
        self.copier = DeviceCopier(self.device)
        self.prefetch = prefetch
        if amp is not None:
            teacher.set_amp(resolve_amp(amp, self.device))

    def view_batch(self, index: np.ndarray, datas: list[bytes], slot: int, stored: bool = False) -> ViewBatch:
        """``datas``: the source images, or with ``stored`` the store's encoded views of them."""
        view = V.view_of_slot(index, slot, self.views)
        boxes, flips = V.view_params(self.seed, index, view, self.data.widths[index], self.data.heights[index])
        visible = V.teacher_visible(self.seed, index, view, self.teacher.name)
        if stored:
            encoded, images = list(datas), pil_stored_views(datas)
        else:
            images, encoded = self.decode(datas, boxes, flips), None
            if self.teacher_input == "jpeg":
                encoded, images = jpeg_round_trip(images)
        return ViewBatch(index, view, boxes, flips, visible, images, encoded=encoded)

    def tokens(self, vb: ViewBatch) -> torch.Tensor:
        """(B, 1 + n_k, C) float32: CLS then visible patch tokens after the final norm."""
        return self._forward(vb.images.to(self.device), torch.from_numpy(vb.visible).to(self.device))

    @torch.inference_mode()
    def _forward(self, images: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        out = self.teacher(images, visible)                 # in the teacher's precision (amp)
        return torch.cat([out["cls"][:, None], out["patch"]], dim=1).float()

    def stream(self, blocks):
        """Tokens of every batch of ``blocks`` ([(index (n,) int64, slot)], or
        [(index, slot, tokens, pixels[, stored])] saying whether the block wants the teacher's
        tokens and the views' pixels, and ``stored`` None or a callable returning the block's
        views as the store holds them, the teacher's input then; in order), with one
        decode thread running ``prefetch`` batches ahead across block boundaries, so that
        decoding overlaps the teacher also when a block is a single batch.

        Every batch holds consecutive images of one block, cut from the block's start, as
        ``batches`` cuts them. Yields (block number, ViewBatch without its images,
        (B, 1 + n_k, C) float32 tokens on the device or None (no tokens wanted), whether it
        is the block's last batch).
        On CUDA the decode thread also pins the batch and starts its copy to the GPU."""
        blocks = list(blocks)

        def produce():
            for k, (index, slot, *wants) in enumerate(blocks):
                want_tokens, want_pixels, stored = (*wants, None)[:3] if wants else (True, False, None)
                datas = self.data.read_many(index) if stored is None else stored()
                for a in range(0, len(index), self.batch_size):
                    b = min(a + self.batch_size, len(index))
                    vb = self.view_batch(index[a:b], datas[a:b], slot, stored=stored is not None)
                    if not want_pixels:
                        vb.encoded = None
                    elif vb.encoded is None:
                        vb.pixels = uint8_views(vb.images)
                    sent = (self.copier.send({"images": vb.images, "visible": torch.from_numpy(vb.visible)})
                            if want_tokens else None)
                    vb.images = None
                    yield k, vb, sent, b == len(index)

        pf = Prefetch(produce(), self.prefetch, context=self.copier.producer_stream, name="decode")
        try:
            for k, vb, sent, last in pf:
                if sent is None:
                    yield k, vb, None, last
                    continue
                moved = self.copier.receive(sent)
                yield k, vb, self._forward(moved["images"], moved["visible"]), last
        finally:
            pf.close()

    def batches(self, index: np.ndarray, slot: int):
        """Yield (ViewBatch without its images, tokens) over ``index`` in order (``stream``
        of one block)."""
        for _, vb, tok, _ in self.stream([(index, slot)]):
            yield vb, tok


def token_stats(batches) -> dict:
    """Mean and principal components of tokens given as an iterable of (B, T, C) tensors
    (every token counts, CLS and patches): mean (C,), components (C, C) rows by decreasing
    variance, eigenvalues (C,), count (tokens)."""
    total, s1, s2 = 0, None, None
    for tok in batches:
        x = tok.reshape(-1, tok.shape[-1]).double().cpu()
        if s1 is None:
            s1 = torch.zeros(x.shape[1], dtype=torch.float64)
            s2 = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        total += x.shape[0]
        s1 += x.sum(0)
        s2 += x.T @ x
    if not total:
        raise ValueError("no tokens to compute statistics from")
    mean = s1 / total
    cov = s2 / total - torch.outer(mean, mean)
    evals, evecs = torch.linalg.eigh(cov)
    order = torch.argsort(evals, descending=True)
    return dict(mean=mean.float().numpy(), components=evecs[:, order].T.float().numpy(),
                eigenvalues=evals[order].clamp_min(0).float().numpy(), count=total)


def compute_stats(extractor: Extractor, *, num_images: int, views: ViewPixels | None = None) -> dict:
    """``token_stats`` of a teacher pass over the slot-0 views of the statistics sample
    (``views.stats_sample``: ``num_images`` images drawn over the whole set), plus
    ``indices`` (n,), the sample. ``views``: the store's view pixels, whose complete slot-0
    blocks give the views instead of the source images (a teacher whose input they are)."""
    index = V.stats_sample(extractor.seed, len(extractor.data), num_images)
    blocks = [(index, 0)]
    if views is not None:
        firsts = np.array([f for f, _ in views.root.shards])
        shard_of = np.searchsorted(firsts, index, side="right") - 1
        done = views.complete_matrix()[0]
        blocks = [(index[shard_of == k], 0, True, False,
                   _views_reader(views, 0, int(k), index[shard_of == k] - firsts[k]) if done[k] else None)
                  for k in np.unique(shard_of)]
    return dict(token_stats(tok for _, _, tok, _ in extractor.stream(blocks)), indices=index)


def _write_stats(ts: TeacherStore, st: dict, origin: dict | None = None) -> None:
    ts.write_stats(st["mean"], st["components"], st["eigenvalues"], st["count"], indices=st["indices"],
                   origin=origin)


def _stats_source(teacher, stats_from) -> TeacherStore:
    """Before any work: the teacher's group in the store ``stats_from``, opened once, which must hold
    ``teacher`` extracted from the same weights (equal checkpoint digests), else its statistics
    would describe other features; StoreError, one line."""
    src = FeatureStore.open(stats_from).teacher(teacher.name)
    theirs = str(src.config.get("checkpoint_digest"))
    if theirs != teacher.digest:
        raise StoreError(f"--stats-from {stats_from}: its teacher {teacher.name} was extracted from checkpoint "
                         f"digest {theirs[:12]}, this one is {teacher.digest[:12]}; take the statistics of a "
                         "store extracted from the same checkpoint")
    return src


def _copy_stats(ts: TeacherStore, src: TeacherStore) -> None:
    """Give ``ts`` the statistics of the same teacher in another store, ``src`` (``_stats_source``),
    with their origin."""
    st = dict(src.stats)
    if st["indices"] is None:
        st["indices"] = np.zeros(0, dtype=np.int64)
    _write_stats(ts, st, origin=dict(store=str(src.root.path), data_digest=src.root.data_digest,
                                     basis=codecs.basis_digest(st)))


def open_teacher_store(*, store_path, data, teacher, views: int, seed: int, codec: str,
                       pca_dim: int, precision: str, view_pixels: str = "none"
                       ) -> tuple[TeacherStore, ViewPixels | None]:
    """Rank 0 creates (or checks) the store, its view pixels (``view_pixels`` other than
    ``none``) and the teacher's group; the others then open them; each rank opens the store and
    its view pixels once. Returns the teacher's group and the store's view pixels (None if it
    has none; with ``view_pixels`` other than ``none``, those this run writes).

    The teacher's input follows the store's view form: with JPEG views (this run's or already
    stored) it runs on the decoded stored view, else on the decoded crop (raw views are that
    crop exactly). An input other than the store's other teachers' is refused before the
    teacher's group or the view pixels are made. Each group is created whole or not at all
    (``create_group_whole``), so a killed or failed creation is started again by a rerun."""
    info = DataInfo.of(data)

    def config(vp: ViewPixels | None) -> dict:
        form = view_pixels if view_pixels != "none" else vp.form if vp is not None else None
        return teacher_config(teacher, codec=codec, pca_dim=pca_dim, precision=precision,
                              input=teacher_input(form))

    if dist.rank() == 0:
        fs = FeatureStore.create_or_open(store_path, data=info, views=views, seed=seed)
        vp = ViewPixels.open(fs)
        if view_pixels != "none" and vp is not None:
            vp.require_form(view_pixels)                      # refuses another form before any change
        ts = fs.create_teacher(teacher.name, config(vp))      # refuses another config, or other teachers' input
        if view_pixels != "none" and vp is None:
            vp = ViewPixels.create(fs, view_pixels)
    dist.barrier()
    if dist.rank() != 0:
        fs = FeatureStore.open(store_path, data=info, views=views, seed=seed)
        vp = ViewPixels.open(fs)
        ts = fs.create_teacher(teacher.name, config(vp))
    return ts, vp


@contextmanager
def sole_writer(store_path, teacher: str):
    """Hold the teacher group's writer lock (store/lock.py) for the block: rank 0 takes it for
    the whole torchrun job (ranks own disjoint shards); if another process holds it, every
    rank raises ``StoreLocked`` naming the holder."""
    lock, refusal = WriterLock(store_path, teacher), None
    if dist.rank() == 0:
        try:
            lock.acquire()
        except StoreLocked as error:
            refusal = str(error)
    refusal = dist.broadcast(refusal)
    if refusal is not None:
        raise StoreLocked(refusal)
    try:
        yield
    finally:
        lock.release()


def run_extraction(cfg: ExtractConfig, *, teacher, data, progress: bool = True) -> dict:
    """Extract ``teacher``'s tokens for every (image, view) of ``data`` into the store
    ``cfg.store`` with the settings of ``cfg`` (extract/config.py: their one default each), as
    the only writer of that teacher: a second one is refused (``StoreLocked``). Rank 0 writes
    the config, resolved (``ExtractConfig.resolved``), beside the store once it is open:
    ``STORE.<teacher>.extract.yaml`` (``config_path``).

    Returns a summary: blocks done and skipped, images written, seconds, images per second.
    ``cfg.max_blocks`` stops after that many blocks (used to measure a short run). SIGTERM or SIGUSR1
    stops it once the current block is written (``core.preempt.Preempted``).
    """
    cfg = cfg.resolved(teacher=teacher, data=data)
    register(getattr(teacher, "descriptor", None) or descriptor(teacher.name))   # its masks: this teacher's ratio
    pixels = cfg.view_pixels != "none"
    with sole_writer(cfg.store, teacher.name), (sole_writer(cfg.store, PIXELS) if pixels else nullcontext()), \
            PreemptSignals() as signals, _log(cfg.store, teacher.name):
        return _extract(cfg, teacher=teacher, data=data, progress=progress, signals=signals)


def _log(store, teacher: str):
    """Rank 0: the extraction's log, STORE.<teacher>.extract.log beside its config (core/log.py), open."""
    if dist.rank() != 0:
        return nullcontext()
    return open_log(config_path(store, teacher).with_suffix(".log"), start=f"start: {command_line()}")


def _extract(cfg: ExtractConfig, *, teacher, data, progress: bool, signals: PreemptSignals | None = None) -> dict:
    """``run_extraction`` without the writer lock; ``cfg`` resolved. ``cfg.stats_from``: another
    store whose statistics of this teacher this store takes instead of its own (a held-out store
    read with the training store's adapters: a coefficient codec then encodes on their basis,
    ``check_same_basis``)."""
    store_path, views, seed, codec, pca_dim = cfg.store, cfg.views, cfg.seed, cfg.codec, cfg.pca_dim
    stats_from, view_pixels, max_blocks = cfg.stats_from, cfg.view_pixels, cfg.max_blocks
    device = dist.local_device(cfg.device)
    amp = resolve_amp(cfg.amp, device)
    precision = "fp32" if amp == "none" else amp          # what the store records its tokens were computed in
    src = _stats_source(teacher, stats_from) if stats_from is not None else None
    ts, pixels = open_teacher_store(store_path=store_path, data=data, teacher=teacher, views=views, seed=seed,
                                    codec=codec, pca_dim=pca_dim, precision=precision, view_pixels=view_pixels)
    vp = pixels if view_pixels != "none" else None       # the view pixels this run writes
    if dist.rank() == 0:
        write_atomic(config_path(store_path, teacher.name), cfg.to_yaml().encode())
    ex = Extractor(teacher, data, seed=seed, views=views, batch_size=cfg.batch_size, device=device,
                   decoder=cfg.decoder, num_threads=cfg.threads, decoder_settings=cfg.decoder_settings,
                   teacher_input=ts.input, amp=amp)
    # the views the teacher reads where a block has them (the ones this run writes, or the store's)
    stored = pixels if ts.input == "jpeg" else None
    # The statistics (docs/format.md), for every codec: a teacher pass over the keyed sample
    # before any block (the coefficient codecs encode on their basis), unrounded tokens.
    stats_how = "already in the store" if ts.has_stats else None
    if stats_how is None and stats_from is not None:
        if dist.rank() == 0:
            _copy_stats(ts, src)
        dist.barrier()
        ts = _written_by_rank_0(ts)
        stats_how = f"copied from {stats_from}"
    if stats_how is None:
        problem = None
        if dist.rank() == 0:
            st = compute_stats(ex, num_images=cfg.stats_images, views=stored)
            problem = codecs.statistics_problem(codec, st["count"], pca_dim=pca_dim)
            if problem is None:
                _write_stats(ts, st)
        problem = dist.broadcast(problem)                 # every rank refuses alike (and syncs)
        if problem:
            raise codecs.CodecError(f"{ts.path}: teacher {teacher.name}: {problem}")
        ts = _written_by_rank_0(ts)
        stats_how = "teacher pass before the blocks"

    done = ts.complete_matrix()
    pixels_done = vp.complete_matrix() if vp is not None else np.ones_like(done)
    have_views = (np.zeros_like(done) if stored is None else pixels_done if stored is vp
                  else stored.complete_matrix())
    mine = [k for k in range(len(ts.root.shards)) if k % dist.world_size() == dist.rank()]
    todo = [(k, s) for k in mine for s in range(views) if not (done[s, k] and pixels_done[s, k])]
    skipped = sum(1 for k in mine for s in range(views) if done[s, k] and pixels_done[s, k])
    if max_blocks is not None:
        todo = todo[:max_blocks]
    total = sum(ts.root.shards[k][1] for k, _ in todo)
    if skipped and dist.rank() == 0:
        tqdm.write(f"{teacher.name}: {skipped} blocks already complete, {len(todo)} to do")
    log_line(f"extract {teacher.name}: {len(todo)} blocks to do, {skipped} already complete; statistics {stats_how}")

    t0, written, pixel_blocks = time.perf_counter(), 0, 0
    bar = progress_bar(total=total, unit="img", desc=f"extract {teacher.name}", progress=progress and total > 0,
               dynamic_ncols=True)
    blocks = []
    for shard, slot in todo:
        first, count = ts.root.shards[shard]
        blocks.append((np.arange(first, first + count), slot, not done[slot, shard], not pixels_done[slot, shard],
                       _views_reader(stored, slot, shard) if have_views[slot, shard] else None))
    with ThreadPoolExecutor(1, thread_name_prefix="write") as writer, closing(ex.stream(blocks)) as batches:
        pending, parts, tokens = None, [], []
        for k, vb, tok, last in batches:               # one decode thread over all blocks
            parts.append(vb)
            if tok is not None:
                tokens.append(tok)
            if not last:
                bar.update(len(vb.index))
                continue
            (shard, slot), (index, _, want_tokens, want_pixels, _) = todo[k], blocks[k]
            count = len(index)
            jobs = []
            if want_tokens:
                payload = codecs.encode(codec, torch.cat(tokens), pca=ts.pca)
                block = dict(index=index, view=np.concatenate([p.view for p in parts]),
                             boxes=np.concatenate([p.boxes for p in parts]),
                             flips=np.concatenate([p.flips for p in parts]),
                             visible=np.concatenate([p.visible for p in parts]), payload=payload)
                jobs.append(partial(ts.write_block, slot, shard, **block))
            if want_pixels:
                written_as = (dict(encoded=[d for p in parts for d in p.encoded]) if parts[0].encoded is not None
                              else dict(pixels=np.concatenate([p.pixels for p in parts])))
                jobs.append(partial(vp.write_block, slot, shard, index=index, **written_as))
                pixel_blocks += 1
            if pending is not None:
                pending.result()          # at most one block in flight; surfaces write errors
            pending = writer.submit(_run_all, jobs)
            parts, tokens = [], []
            written += count
            bar.set_postfix(blocks=f"{k + 1}/{len(todo)}")
            bar.update(len(vb.index))                       # after the postfix: a progress line shows this block
            if signals is not None and signals.received():  # this rank's own: blocks need no agreement
                pending.result()                            # the block is in the store; a rerun skips it
                raise signals.stop(f"preempted by {signals.received()} after block {k + 1} of {len(todo)}: the store "
                                   f"holds {teacher.name}'s finished blocks; run the same command to continue")
        if pending is not None:
            pending.result()
    bar.close()
    dist.barrier()
    seconds = time.perf_counter() - t0
    return dict(teacher=teacher.name, blocks=len(todo), skipped=skipped, images=written,
                seconds=seconds, images_per_second=written / seconds if seconds > 0 else float("nan"),
                stats=stats_how, pixel_blocks=pixel_blocks)


def _written_by_rank_0(ts: TeacherStore) -> TeacherStore:
    """``ts`` with what rank 0 wrote into its group's metadata (the statistics): rank 0's own
    handle, which wrote it; on another rank a new handle on the group, its metadata read again
    (the store is not opened again)."""
    return ts if dist.rank() == 0 else TeacherStore(ts.root, ts.root.group[ts.name])


def _run_all(jobs) -> None:
    for job in jobs:
        job()


def _views_reader(vp: ViewPixels, slot: int, shard: int, rows: np.ndarray | None = None):
    """A callable returning the block's stored views (bytes, in sample order; only ``rows`` of it)."""
    def read() -> list[bytes]:
        datas = vp.read_block(slot, shard)[1]
        return datas if rows is None else [datas[r] for r in rows]

    return read
