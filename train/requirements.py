"""What a cached run requires of its store, each a one-line StoreError when it does not hold:
the student's pixels are its teachers' (``student_pixels``), the masks are this code's
(``check_mask_ratio``), the codec suits the adapters (``check_codec``), a store read with
another store's adapters is of the same teacher weights (``check_same_teacher``) and holds its
coefficients on that store's basis (``check_same_basis``)."""
from __future__ import annotations

from store import codecs
from data import views as V
from teachers.descriptors import descriptor
from store.features import FeatureStore, StoreError, teacher_input
from store.viewpixels import ViewPixels


def student_pixels(fs: FeatureStore, stores, pixels: str) -> tuple[str, ViewPixels | None]:
    """(``views`` or ``source``, the view tars to train from or None) for ``data.pixels`` on
    the teachers' ``stores``: the student must see the pixels its teachers ran on
    (``TeacherStore.input``): stored JPEG views for a teacher of input ``jpeg``, the decoded
    crop (or raw views, that crop exactly) for ``source``. ``auto`` takes the views when they
    are complete and match; anything else that does not match is refused (StoreError, one line)."""
    if pixels not in ("auto", "source", "views"):
        raise ValueError(f"data.pixels={pixels!r}: choose auto, source or views")
    vp = ViewPixels.open(fs)
    complete = vp is not None and not vp.missing()
    jpeg = sorted(ts.name for ts in stores if ts.input == "jpeg")
    source = sorted(ts.name for ts in stores if ts.input != "jpeg")
    if jpeg and source:
        raise StoreError(f"{fs.path}: its teachers ran on different pixels ({', '.join(source)} on the source "
                         f"crops, {', '.join(jpeg)} on the stored JPEG views), so no student pixels match them "
                         "all; extract every teacher of a store with the same --view-pixels")
    views_match = complete and all(ts.input == teacher_input(vp.form) for ts in stores)
    if pixels == "auto":
        pixels = "views" if views_match else "source"
    if pixels == "views" and not complete:
        what = "holds no view pixels" if vp is None else f"has {len(vp.missing())} incomplete view blocks"
        raise StoreError(f"{fs.path}: {what}, but data.pixels=views; run `python cli.py extract "
                         "--view-pixels jpeg` (or raw) on it, or set data.pixels=source")
    if pixels == "views" and not views_match:
        raise StoreError(f"{fs.path}: teachers {', '.join(source)} ran on the source crops, not on the stored "
                         f"{vp.form} views, so data.pixels=views would show the student other pixels; set "
                         "data.pixels=source, or extract them into a store that holds its JPEG views first")
    if pixels == "source" and jpeg:
        fix = ("data.pixels=views" if complete else
               "data.pixels=views once `python cli.py extract --view-pixels jpeg` has completed the view blocks")
        raise StoreError(f"{fs.path}: teachers {', '.join(jpeg)} ran on the stored JPEG views, so the student "
                         f"must read them too: set {fix}")
    return pixels, (vp if pixels == "views" else None)


def check_mask_ratio(ts) -> None:
    """The store's masks must be the ones this code draws for the teacher (its descriptor's ratio,
    what the online path and the method use); else StoreError, one line."""
    ratio = descriptor(ts.name).mask_ratio
    stored = (ts.config.get("mask_ratio"), ts.n_visible)
    if stored != (ratio, V.num_visible(ratio)):
        raise StoreError(f"{ts.path}: config mask_ratio={stored[0]} (n_visible {stored[1]}) but this run "
                         f"masks teacher {ts.name} at {ratio} (n_visible {V.num_visible(ratio)}, "
                         "teachers/descriptors.py); extract a new store")


def check_codec(ts, *, trainable: bool, width: int, init: str = "pca") -> None:
    """The store's codec must hold what the adapters read (store/codecs.py): a trainable
    adapter learns from the full-width tokens, a frozen one from the top ``width``
    principal coefficients, which only the statistics' own basis (``adapters.init=pca``) reads
    as W t, from statistics of enough tokens; else StoreError, one line."""
    dim = int(ts.config.get("pca_dim") or 0) if ts.codec not in codecs.FULL_TOKENS else 0
    if dim and init != "pca":
        raise StoreError(f"{ts.path}: codec {ts.codec} stores coefficients on the statistics' basis, which "
                         f"adapters.init={init} does not read as its W t; use adapters.init=pca or a store "
                         f"extracted with --codec {' or '.join(codecs.FULL_TOKENS)}")
    problem = codecs.statistics_problem(ts.codec, ts.stats["count"], pca_dim=dim) if dim and ts.has_stats else None
    if problem:
        raise StoreError(f"{ts.path}: {problem}")
    if trainable and ts.codec not in codecs.FULL_TOKENS:
        raise StoreError(f"{ts.path}: codec {ts.codec} keeps only {dim} principal coefficients per token, "
                         f"but adapters.mode=trainable learns from the full tokens; use adapters.mode=frozen "
                         f"or a store extracted with --codec {' or '.join(codecs.FULL_TOKENS)}")
    if dim and dim < width:
        raise StoreError(f"{ts.path}: codec {ts.codec} keeps {dim} principal coefficients per token, fewer "
                         f"than the adapters' width {width} (model.embed_dim); train this student on a store "
                         f"extracted with --codec {' or '.join(codecs.FULL_TOKENS)}, or --codec pca --pca-dim "
                         f"{width} or more")


def check_same_teacher(ts, reference) -> None:
    """``ts`` and ``reference`` (TeacherStores of one teacher name in two stores) hold the tokens of
    the same weights: equal checkpoint digests (statistics copied from another checkpoint's store
    would match its basis and still read other features). Else StoreError, one line."""
    got, want = ts.config.get("checkpoint_digest"), reference.config.get("checkpoint_digest")
    if got != want:
        raise StoreError(f"{ts.path}: teacher {ts.name} has checkpoint digest {str(got)[:12]}, but "
                         f"{reference.path} was extracted from {str(want)[:12]}; extract both stores from the "
                         "same checkpoint")


def check_same_basis(ts, reference) -> None:
    """``ts`` (a TeacherStore) is to be read with the adapters built from ``reference``'s
    statistics (another store of the same teacher, e.g. the training store while ``ts`` holds
    held-out images): the teacher weights must be the same (``check_same_teacher``), and a
    coefficient codec must be on ``reference``'s basis (extraction's ``stats_from``); full tokens
    (fp16, int8) are read alike in any basis. Else StoreError."""
    check_same_teacher(ts, reference)
    if ts.codec in codecs.FULL_TOKENS:
        return
    if not (ts.has_stats and reference.has_stats
            and codecs.basis_digest(ts.stats) == codecs.basis_digest(reference.stats)):
        raise StoreError(f"{ts.path}: codec {ts.codec} holds coefficients on its own statistics' basis, not on "
                         f"that of {reference.path}, whose adapters read it; extract it with that store's "
                         f"statistics (run_extraction(stats_from={str(reference.root.path)!r})) or with "
                         f"--codec {' or '.join(codecs.FULL_TOKENS)}")
