"""The demo report, written twice from one list of blocks (``report_blocks``): OUT/report/README.md
(Markdown beside its PNG figures) and OUT/report/report.html, one self-contained page (styles
inline, every figure embedded as a ``data:`` URI, no link to any file or server), to mail or
open anywhere."""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path

import numpy as np

__all__ = ["report_blocks", "to_html", "to_markdown", "write_report"]

_CSS = """body{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem;line-height:1.45}
table{border-collapse:collapse;margin:0.8rem 0}th,td{border:1px solid #ccc;padding:0.2rem 0.5rem}
th{background:#f2f2f2}td.r,th.r{text-align:right}code{background:#f4f4f4;padding:0 0.2rem}
img{max-width:100%;display:block;margin:0.8rem 0}"""


def _stage_table(stages: list[dict], first: dict | None) -> tuple:
    """This invocation's stages; with ``first`` (stage -> seconds of the first invocation, which
    did the work this one reused), a column with those times too."""
    def sec(x):
        return f"{x:.1f}" if x is not None and np.isfinite(x) else "-"
    if first is None:
        return ("table", ["stage", "seconds", "what happened"],
                [[s["stage"], sec(s["seconds"]), s["note"]] for s in stages], "lrl")
    return ("table", ["stage", "first run (s)", "this run (s)", "what happened in this run"],
            [[s["stage"], sec(first.get(s["stage"])), sec(s["seconds"]), s["note"]] for s in stages], "lrrl")


def _align(header, align):
    return align or "l" + "r" * (len(header) - 1)


def to_markdown(blocks: list[tuple]) -> str:
    """The blocks as Markdown; images are links to their files beside README.md."""
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + rest[0])
        elif kind == "p":
            out.append(rest[0])
        elif kind == "img":
            out.append(f"![{rest[0]}]({rest[1]})")
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in rest[0]))
        elif kind == "table":
            header, rows, align = rest[0], rest[1], _align(rest[0], rest[2])
            lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
            out.append("\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]))
        else:
            raise ValueError(f"report block kind {kind!r}")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    """Escaped text with the blocks' two marks: ``**bold**`` and `code`."""
    text = html.escape(str(text), quote=False)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


def _data_uri(path: Path) -> str:
    kind = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: the HTML report embeds PNG or JPEG figures only")
    return f"data:{kind};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def to_html(blocks: list[tuple], folder) -> str:
    """The blocks as one HTML page that needs nothing else: the figures named by "img" blocks
    are read from ``folder`` and embedded as data: URIs."""
    folder = Path(folder)
    title = next((b[1] for b in blocks if b[0] == "h1"), "report")
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
           f"<style>{_CSS}</style></head><body>"]
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{_inline(rest[0])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_inline(rest[0])}</p>")
        elif kind == "img":
            out.append(f'<img alt="{html.escape(rest[0])}" src="{_data_uri(folder / rest[1])}">')
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in rest[0]) + "</ul>")
        elif kind == "table":
            header, rows, align = rest[0], rest[1], _align(rest[0], rest[2])
            cls = [' class="r"' if a == "r" else "" for a in align]
            out.append("<table><tr>" + "".join(f"<th{c}>{_inline(h)}</th>" for c, h in zip(cls, header)) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td{c}>{_inline(v)}</td>" for c, v in zip(cls, row)) + "</tr>"
                                 for row in rows) + "</table>")
        else:
            raise ValueError(f"report block kind {kind!r}")
    return "\n".join(out + ["</body></html>"]) + "\n"


def write_report(folder, info: dict) -> tuple[Path, Path]:
    """Write ``folder``/README.md and ``folder``/report.html (its figures already in ``folder``)
    from the ``info`` dict that demo/pipeline.py gathers; returns both paths."""
    folder = Path(folder)
    blocks = report_blocks(info)
    md, page = folder / "README.md", folder / "report.html"
    md.write_text(to_markdown(blocks))
    page.write_text(to_html(blocks, folder))
    return md, page


def report_blocks(info: dict) -> list[tuple]:
    """The report's content, once, as blocks that ``to_markdown`` and ``to_html`` render:
    ("h1" | "h2" | "p", text), ("table", header, rows, align), ("img", alt, file name in the
    report folder), ("ul", items). Text may hold ``**bold**`` and ``code`` in backticks."""
    t = info["teachers"]
    untrained = [n for n, v in t.items() if v["untrained"]]
    out: list[tuple] = [("h1", "CoMAD demo report")]
    if untrained:
        out += [("p", f"**The teachers {', '.join(untrained)} are UNTRAINED (random initialisation)**: no official "
                  "checkpoint was given (`--checkpoints DIR`). Everything below exercises the real pipeline, "
                  "but the student distils random features; its numbers say nothing about the paper's.")]
    out += [("p", "Teachers: " + ", ".join(f"{n} ({'random init' if v['untrained'] else v['source']})"
                                           for n, v in t.items()) + "."),
            ("p", f"Data: {info['data']['train']} training images and {info['data']['heldout']} held-out images "
              f"(scikit-image photos; the held-out ones are other photos than the training ones, so no held-out "
              f"pixel was trained on), "
              f"{info['data']['views']} cached views per training image, device `{info['device']}`."),
            ("h2", "Stages"), _stage_table(info["stages"], info.get("first_stages"))]
    run = info["run"]
    out += [("h2", "Training"),
            ("p", f"{run['steps']} steps of batch {run['batch_size']} (lr {run['lr']:.2g}, cached store), final loss "
              f"{run['final']['loss']:.4f} (token {run['final']['loss_token']:.4f}, spatial "
              f"{run['final']['loss_spatial']:.4f}); run folder `{run['dir']}`."),
            ("img", "losses", "losses.png"), ("img", "gate shares", "gates.png")]
    c, loss = info["cka"], info["heldout_loss"]
    names = [n for n in t]
    ratio = loss["trained"]["total"] / loss["untrained"]["total"]
    out += [("h2", "Quality check: held-out loss"),
            ("p", f"The objective's losses on the {info['data']['heldout']} held-out views (photos none of whose "
              "crops was trained on), for the trained student and for the untrained one (the same config and seed before "
              "any step), against the same fused targets: the run's adapters and its gate without the "
              f"student-affinity term (`{loss['gate']}` weights), so the targets do not depend on the student. "
              "This is what distillation lowers; if it were broken, the trained row would stay at the "
              "untrained level."),
            ("table", ["student", "token loss", "spatial loss", "total"],
             [[lab, *[f"{loss[lab][k]:.4f}" for k in ("token", "spatial", "total")]]
              for lab in ("trained", "untrained")], None),
            ("p", f"Trained / untrained, total: {ratio:.2f} (the last logged training loss, on training views "
              f"with the run's own gate: {run['final']['loss']:.4f})."),
            ("h3", "Linear CKA with the fused targets"),
            ("p", f"Linear CKA between the student's encoder tokens (CLS + its visible patches) and the same fused "
              f"targets at the same positions, over {c['tokens']} tokens of the held-out views (student positions "
              "no teacher saw have no target); per-teacher columns compare with one teacher's adapted tokens "
              "where it saw the patch. CKA compares representations up to rotation and scale, which is not what "
              "the loss optimises (a softmax over channels per token). With untrained teachers and a short run it "
              "need not rise: random ViTs' tokens are already similar to each other (see the untrained row's "
              "per-teacher columns); with official teachers and real training it is a number to watch."),
            ("table", ["student", "fused targets", *names],
             [[lab, f"{c['fused'][lab]:.3f}", *[f"{c[n][lab]:.3f}" for n in names]]
              for lab in ("trained", "untrained")], None)]
    out += [("h2", "Gate weights on held-out views"),
            ("p", "Each panel: the view (decoded crop), each teacher's mask (dimmed = hidden), the student's mask, "
              "and below the per-position gate weight w_k(p) of each teacher (grey: that teacher did not see "
              "the patch) and which teacher weighs most.")]
    out += [("img", "panel", p) for p in info["panels"]]
    out += [("h2", "Training throughput")]
    tp = info["throughput"]
    if tp.get("rows"):
        warm = tp.get("online_warmup", tp["warmup"])
        out += [("p", f"Measured in this demo on `{tp['device']}`, batch {tp['batch_size']}: the cached row is the "
                      f"training stage's own rate (the median of {tp.get('cached_intervals', '?')} logged intervals "
                      "of the run; the first, with the start-up, is left out when there are others); ceiling and "
                      f"online are `train.throughput.measure` (ceiling: the median of 3 rounds of {tp['steps']} "
                      f"timed steps after {tp['warmup']} warm-up step; online: 1 round of "
                      f"{tp.get('online_steps', tp['steps'])} after {warm} warm-up step"
                      + (", its teachers already warm from the extract stage" if warm == 0 else "")
                      + "). Short measurements, noisy on a shared CPU."),
                ("table", ["path", "images/s", "x online", "/ ceiling"],
                 [[r["mode"], f"{r['images_per_second']:.1f}",
                   "-" if r.get("vs_online") is None else f"{r['vs_online']:.2f}",
                   "-" if r.get("vs_ceiling") is None else f"{r['vs_ceiling']:.2f}"] for r in tp["rows"]], None),
                ("p", "cached: store blocks + DALI decoding + the step; online: the same decoding plus the three "
                  "teachers every step; ceiling: the step alone on batches already in memory.")]
    else:
        out += [("p", f"Not measured: {tp.get('skipped', 'unknown reason')}.")]
    sz = info["sizes"]
    out += [("h2", "Store size per codec"),
            ("p", f"Measured by encoding every teacher's tokens of {sz['measured_samples']} of the store's "
              "(image, view) samples with each codec and compressing with zstd level 1 (the store's compressor); "
              "per (image, view) for the three teachers together; the error is relative to the teachers' float "
              f"tokens. The demo store itself is {sz['codec']}: its files hold {sz['actual_bytes'] / 2**20:.1f} MiB, "
              f"of which {sz['stats_bytes'] / 2**20:.1f} MiB are the adapter statistics, "
              f"{sz['pixels_bytes'] / 2**20:.1f} MiB the stored views and "
              f"{(sz['actual_bytes'] - sz['stats_bytes'] - sz['pixels_bytes']) / 2**20:.1f} MiB the samples "
              f"(projected from the measurement: {sz['projected_bytes'] / 2**20:.1f} MiB)."),
            ("table", ["codec", "raw KiB", "zstd KiB", "rel. error", "this demo (MiB)", "ImageNet-1K x 4 views (TiB)"],
             [[r["codec"], f"{r['raw_bytes'] / 1024:.1f}", f"{r['zstd_bytes'] / 1024:.1f}",
               f"{r['rel_error']:.4f}", f"{r['demo_bytes'] / 2**20:.1f}",
               f"{r['imagenet_bytes'] / 2**40:.2f}"] for r in sz["rows"]], None)]
    if info.get("reused"):
        out += [("h2", "Reused from an earlier run"), ("ul", list(info["reused"]))]
    return out
