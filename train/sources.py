"""The batch source of a run's config (cached, online-replay or online-fresh) and the teachers'
statistics that initialise its adapters."""
from __future__ import annotations

from train.config import Config, teacher_names
from train.loader import CachedSource, Plan
from train.runstore import RunStore

__all__ = ["build_source", "decoder_settings"]


def build_source(cfg: Config, plan: Plan, *, device: str, store: RunStore | None = None, online: bool | None = None,
                 run_dir=None, teachers: dict | None = None):
    """The batch source of ``cfg.data.source`` and the teachers' statistics (adapter
    initialisation). ``store``: the run's store (``open_run_store``); without it a caller that has
    none open (a bench, a test) has the config's ``data.store`` opened here, once, for the plan.
    ``online`` (the old switch) overrides the source: True is online-replay, False cached.
    ``run_dir`` keeps the statistics of an online-fresh run without a store. ``teachers``
    (online only): {name: Teacher} already built, used instead of building them (the demo
    reuses its extraction's), checked against the store all the same."""
    source = cfg.data.source if online is None else ("online-replay" if online else "cached")
    kw = dict(decoder=cfg.data.decoder, device=device, num_threads=max(1, cfg.data.num_workers),
              decoder_settings=decoder_settings(cfg))
    if store is None and cfg.data.store:
        store = RunStore.open(cfg.data.store, plan.data, seed=plan.seed, source=source, teachers=teacher_names(cfg),
                              views=plan.views, pixels=cfg.data.pixels, store_views=plan.store_views)
    if source == "cached":
        if store is None:
            raise ValueError("data.source=cached reads the teacher tokens from a store: give --store "
                             "(data.store), or train online (data.source=online-fresh)")
        store.check_learners([cfg])
        return CachedSource(plan, store, **kw), store.stats
    from train.online import build_online_source
    return build_online_source(cfg, plan, fresh=(source == "online-fresh"), store=store, run_dir=run_dir,
                               prebuilt=teachers, **kw)


def decoder_settings(cfg: Config) -> dict:
    """The GPU decoder's settings of the config, as ``make_decoder`` takes them."""
    return dict(hw_decoder_load=cfg.data.hw_decoder_load, preallocate_width_hint=cfg.data.preallocate_width_hint,
                preallocate_height_hint=cfg.data.preallocate_height_hint)
