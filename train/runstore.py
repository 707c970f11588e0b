"""The feature store of a run, opened once (``open_run_store``): what the run takes from it resolved
(teachers, views, the student's pixels) and all it requires of it checked before any work
(train/requirements.py), so that the sources, the adapters' statistics, the sweep's held-out
report and the diagnostics read that one ``RunStore`` instead of opening the store again."""
from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

from data.decoders import resolve_decoder
from data.order import auto_streams
from store.features import DataInfo, FeatureStore, StoreError
from teachers.descriptors import PAPER_TEACHERS, is_teacher_name, teacher_order
from train.config import AUTO, Config
from train.requirements import check_codec, check_mask_ratio, student_pixels

__all__ = ["RunStore", "open_run_store", "resolve_data"]

# What a run of each data.source checks the store against when it opens it: a cached run reads its
# blocks (the images and the seed they were drawn with), an online-replay run redraws its views
# (the seed), an online-fresh one takes only its teachers and their statistics (the images).
_IDENTITY = {"cached": ("data", "seed"), "online-replay": ("seed",), "online-fresh": ("data",)}


class RunStore:
    """A feature store opened for one run (``open``) and what the run takes from it.

    ``fs``: the FeatureStore; ``source``: the run's data.source; ``teachers``: {name:
    TeacherStore} of the run's teachers in its order; ``views``: the v views it trains on (1..V,
    ``store_views``); ``pixels``: the student's pixels, ``views`` or ``source``, and
    ``view_pixels`` the view tars a cached run reads them from (None: it decodes the images);
    ``stats``: {teacher: (mean, components)}, what the adapters start from (train/objective.py)."""

    def __init__(self, fs: FeatureStore, *, source: str, teachers: dict, views: int, pixels: str, view_pixels):
        self.fs, self.source, self.teachers = fs, source, teachers
        self.views, self.pixels, self.view_pixels = int(views), pixels, view_pixels
        self.stats = {n: (ts.stats["mean"], ts.stats["components"]) for n, ts in teachers.items()}
        self._served: set[tuple] = set()        # adapter settings whose codec needs were checked

    @property
    def path(self):
        return self.fs.path

    @property
    def store_views(self) -> int:
        return self.fs.views

    @property
    def seed(self) -> int:
        return self.fs.seed

    @classmethod
    def open(cls, path, data, *, seed: int, source: str = "cached", teachers=AUTO, views=AUTO, pixels=AUTO,
             store_views: int | None = None) -> "RunStore":
        """Open the store at ``path`` once for a run of ``source`` over the images ``data`` with
        ``seed`` (``store_views``: the V it must have, if known), and check what that run needs.

        ``teachers``: names, or ``auto`` for every teacher of the store in registry order
        (teachers/descriptors.py); ``views``: 1..V, or ``auto`` for V; ``pixels``: ``views``,
        ``source`` or ``auto`` (``student_pixels``). A cached run also needs every block of its
        teachers and their masks drawn at this code's ratios (``check_mask_ratio``); every run
        with a store reads its teachers' statistics. Anything else is a StoreError, one line
        but for the store's identity (store/features.py lists what differs)."""
        checks = _IDENTITY[source]
        fs = FeatureStore.open(path, data=DataInfo.of(data) if "data" in checks else None,
                               seed=seed if "seed" in checks else None, views=store_views)
        names = _described_teachers(fs) if teachers == AUTO else tuple(teachers)
        if views == AUTO:
            views = fs.views
        elif not 1 <= int(views) <= fs.views:
            raise StoreError(f"{fs.path}: holds {fs.views} views per image but the config sets "
                             f"data.views={views}; set data.views to auto or to 1..{fs.views}")
        stores = {name: fs.teacher(name) for name in names}
        view_pixels = None
        if source == "cached":
            pixels, view_pixels = student_pixels(fs, list(stores.values()), pixels)
            for ts in stores.values():
                ts.require_complete()
                check_mask_ratio(ts)
        elif pixels == AUTO:
            pixels = "source"
        return cls(fs, source=source, teachers=stores, views=views, pixels=pixels, view_pixels=view_pixels)

    def check_learners(self, configs: Iterable[Config]) -> None:
        """Refuse (one line) a learner whose adapters or student width the stored codecs cannot
        serve (``check_codec``), each setting checked once; a run that does not read the stored
        tokens (online) passes."""
        if self.source != "cached":
            return
        for cfg in configs:
            setting = (cfg.adapters.mode == "trainable", int(cfg.model.embed_dim), cfg.adapters.init)
            if setting not in self._served:
                for ts in self.teachers.values():
                    check_codec(ts, trainable=setting[0], width=setting[1], init=setting[2])
                self._served.add(setting)


def _described_teachers(fs: FeatureStore) -> tuple[str, ...]:
    """The store's teachers in registry order (``teacher_order``: the described ones, then timm
    teachers); StoreError if it holds none, or one no descriptor names."""
    held = fs.teachers
    names = tuple(sorted((n for n in held if is_teacher_name(n)), key=teacher_order))
    unknown = sorted(set(held) - set(names))
    if unknown:
        raise StoreError(f"{fs.path}: holds teachers {unknown} that teachers/descriptors.py does not describe; "
                         "set data.teachers to the ones to train")
    if not names:
        raise StoreError(f"{fs.path}: holds no teachers; run extract first")
    return names


def open_run_store(cfg: Config, data, *, recorded: Mapping | None = None,
                   device=None) -> tuple[Config, RunStore | None]:
    """(``cfg`` with ``data.teachers`` set to names, ``data.views`` and ``data.streams`` to numbers,
    ``data.pixels`` to ``views`` or ``source`` and ``data.decoder`` to ``dali``, ``torchvision`` or ``pil``; its
    store ``data.store`` opened once for the run and checked, ``RunStore.open``, or None without one).

    data: the packed image set (data/imageset.ImageSet). ``recorded``: the ``data`` section of
    the config a resumed run recorded; an ``auto`` key takes its recorded value first, so a
    resumed run keeps its teachers (if the store gains one), streams, pixels (if view pixels
    were added meanwhile) and decoder.
    ``teachers``: ``auto`` takes the store's (``RunStore.open``), else, without a store, the
    paper's three. ``views``: ``auto`` takes the store's V (1 without a store: online-fresh);
    an explicit v < V trains on the store's first v slots (``Plan.store_views``); more views
    than the store holds are refused. ``streams``: ``auto`` is ``auto_streams``. ``pixels``:
    ``auto`` is ``views`` for a cached run whose store's view pixels are complete
    (store/viewpixels.py) and are what its teachers ran on (``student_pixels``), else ``source``.
    ``decoder``: ``auto`` is ``dali`` where DALI is installed, else ``torchvision`` on a CUDA ``device``
    (the run's; None: not known), else ``pil`` (data/decoders.py: ``resolve_decoder``)."""
    recorded = recorded or {}

    def chosen(key: str):
        value = getattr(cfg.data, key)
        return recorded.get(key, AUTO) if value == AUTO else value

    store = None
    if cfg.data.store:
        store = RunStore.open(cfg.data.store, data, seed=cfg.data.seed, source=cfg.data.source,
                              teachers=chosen("teachers"), views=cfg.data.views, pixels=chosen("pixels"))
        teachers, views, pixels = tuple(store.teachers), store.views, store.pixels
    else:
        teachers = PAPER_TEACHERS if chosen("teachers") == AUTO else tuple(chosen("teachers"))
        views = 1 if cfg.data.views == AUTO else int(cfg.data.views)   # online-fresh: V picks the statistics' views
        pixels = "source" if chosen("pixels") == AUTO else chosen("pixels")
    decoder = resolve_decoder(chosen("decoder"), device=device) if cfg.data.decoder == AUTO else cfg.data.decoder
    streams = chosen("streams")
    if streams == AUTO:
        streams = auto_streams([[int(s["first"]), int(s["count"])] for s in data.shards],
                               global_batch=cfg.train.batch_size)
    return dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, teachers=teachers, views=int(views), streams=int(streams), pixels=pixels, decoder=decoder)), store


def resolve_data(cfg: Config, data, *, recorded: Mapping | None = None) -> Config:
    """The resolved config of ``open_run_store``, for a caller that reads no store itself (its checks still apply)."""
    return open_run_store(cfg, data, recorded=recorded)[0]
