"""The batch source of a run's config (cached, online-replay or online-fresh) and the teachers'
statistics that initialise its adapters."""
from __future__ import annotations

from train.config import Config, teacher_names
from train.loader import CachedSource, Plan
from train.requirements import check_codec

__all__ = ["build_source", "decoder_settings", "check_learner_codec"]


def _teacher_stats(stores: dict) -> dict:
    return {name: (ts.stats["mean"], ts.stats["components"]) for name, ts in stores.items()}


def build_source(cfg: Config, plan: Plan, *, device: str, online: bool | None = None, run_dir=None,
                 teachers: dict | None = None):
    """The batch source of ``cfg.data.source`` and the teachers' statistics (adapter
    initialisation). ``online`` (the old switch) overrides it: True is online-replay, False
    cached. ``run_dir`` keeps the statistics of an online-fresh run without a store.
    ``teachers`` (online only): {name: Teacher} already built, used instead of building them
    (the demo reuses its extraction's), checked against the store all the same."""
    source = cfg.data.source if online is None else ("online-replay" if online else "cached")
    kw = dict(decoder=cfg.data.decoder, device=device, num_threads=max(1, cfg.data.num_workers),
              decoder_settings=decoder_settings(cfg))
    if source == "cached":
        if not cfg.data.store:
            raise ValueError("data.source=cached reads the teacher tokens from a store: give --store "
                             "(data.store), or train online (data.source=online-fresh)")
        cached = CachedSource(plan, store_path=cfg.data.store, teachers=teacher_names(cfg),
                              pixels=cfg.data.pixels, **kw)
        check_learner_codec(cfg, cached)
        return cached, _teacher_stats(cached.stores)
    from train.online import build_online_source
    return build_online_source(cfg, plan, fresh=(source == "online-fresh"), run_dir=run_dir, prebuilt=teachers,
                               **kw)


def decoder_settings(cfg: Config) -> dict:
    """The GPU decoder's settings of the config, as ``make_decoder`` takes them."""
    return dict(hw_decoder_load=cfg.data.hw_decoder_load, preallocate_width_hint=cfg.data.preallocate_width_hint,
                preallocate_height_hint=cfg.data.preallocate_height_hint)


def check_learner_codec(cfg: Config, source) -> None:
    """Refuse (one line) a cached source whose stored codec cannot serve ``cfg``'s adapters and
    student width (train/requirements.py); the online sources store nothing and pass."""
    for ts in getattr(source, "stores", {}).values():
        check_codec(ts, trainable=cfg.adapters.mode == "trainable", width=cfg.model.embed_dim,
                    init=cfg.adapters.init)
