"""The trained student for others to use: a timm model folder with a model card, or one file.

``export_run(RUN, OUT)`` rebuilds the student from RUN/last.pt: OUT ending in ``.safetensors`` is
one file, the timm state dict with a zero 1000-class head (as RUN/student.safetensors); any other
OUT is a folder as timm's ``save_for_hf`` writes it, optionally pushed to the hub, loaded back as
the student's own architecture (``architecture``). What the folder holds: docs/running.md, section 5."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from core.io import sha256_file, write_atomic
from core.run import EVAL_ROOT, RESULT, load_checkpoint, read_metrics
from core.state import load_strict
from data.decode import MEAN, SIZE, STD
from store.teacherstore import with_defaults
from teachers.descriptors import descriptor, most_restrictive
from train.config import teacher_names

__all__ = ["student_state_dict", "export_student", "architecture", "hub_model", "find_results",
           "model_card", "export_run", "FOLDER_FILES"]

# What an export folder holds: timm's weights and config, and the model card.
WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
FOLDER_FILES = (WEIGHTS, CONFIG, CARD)
TASK = "image-feature-extraction"   # the hub's pipeline tag of a backbone without a classifier
STUDENT_FILE = "student.safetensors"  # what train/loop.py writes into the run folder
# The preprocessing the student was trained with (data/decode/pixels.py), for pretrained_cfg.
DATA_CONFIG = {"input_size": (3, SIZE, SIZE), "mean": tuple(MEAN), "std": tuple(STD)}
PAPER = "https://arxiv.org/abs/2508.04816"
# What config.json's pretrained_cfg says besides timm's own record (the folder and a push write the same).
HUB_CONFIG = {"pretrained_cfg": {"tag": "comad", "license": "other"}}
# What the ImageNet data's terms are called in a card (class folders named by WordNet ids).
IMAGENET_TERMS = ("ImageNet's terms of access apply (https://image-net.org/download.php: non-commercial "
                  "research and educational use)")


def _vit(student) -> nn.Module:
    return student.vit if hasattr(student, "vit") else student


def student_state_dict(student) -> dict[str, torch.Tensor]:
    """timm ViT keys. The classifier (``head``) was never trained: it is written as zeros of the
    default 1000 classes so that timm's strict pretrained loading accepts the file
    (``pretrained=True`` with the default classes; ``num_classes=0`` or any other count drops
    it). Every ``eval`` protocol (eval/common.py: load_backbone) and ``model.checkpoint`` drop
    the all-zero head when they load the file (``core.state.drop_placeholder_head``)."""
    vit = _vit(student)
    sd = {k: v.detach().float().cpu().contiguous() for k, v in vit.state_dict().items()
          if not k.startswith("head")}
    width = sd["cls_token"].shape[-1]
    sd["head.weight"] = torch.zeros(1000, width)
    sd["head.bias"] = torch.zeros(1000)
    return sd


def _model_args(vit: nn.Module) -> dict[str, Any]:
    """The arguments that rebuild ``vit`` (timm's record of them, drop rates left out)."""
    from timm.models import get_model_args
    return get_model_args(vit)


def student_file(student) -> bytes:
    """The single-file export: safetensors bytes of ``student_state_dict``, with the architecture
    and its model arguments (JSON; the file's classifier is the placeholder, so no ``num_classes``)
    in the metadata."""
    from safetensors.torch import save
    vit = _vit(student)
    args = {k: v for k, v in _model_args(vit).items() if k != "num_classes"}
    return _sorted_header(save(student_state_dict(student), metadata={
        "format": "pt", "arch": architecture(vit), "model_args": json.dumps(args, sort_keys=True)}))


def _sorted_header(data: bytes) -> bytes:
    """safetensors bytes with the JSON header's keys sorted. safetensors writes the metadata from
    a hash map, in an order that changes from call to call: the same weights would give files of
    different sha256 (and eval's run folders are named by it). The header stays padded with
    spaces to a multiple of 8 bytes, as the format has it; the tensor bytes are unchanged."""
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + n:]


def export_student(student, out) -> Path:
    """Write the student as one timm state dict file (safetensors), atomically."""
    return write_atomic(out, student_file(student))


def _signature(vit: nn.Module) -> tuple:
    heads = tuple(getattr(getattr(b, "attn", None), "num_heads", None) for b in getattr(vit, "blocks", ()))
    return type(vit), tuple((k, tuple(v.shape)) for k, v in vit.state_dict().items()), heads


def architecture(vit: nn.Module) -> str:
    """The timm name of ``vit``'s architecture: of the registered models of its family (the name it
    was built as, with the size word a wildcard: ``vit_*_patch16_224``), the one that, built at
    ``vit``'s depth, has its class, parameter names and shapes and attention heads; the name it
    was built as when none has. A ``vit_tiny_patch16_224`` built 384 wide with 6 heads is a
    ``vit_small_patch16_224``; the depth is a model argument either way."""
    import timm
    own = vit.pretrained_cfg["architecture"]
    parts = own.split("_")
    family = "_".join([parts[0], "*", *parts[2:]]) if len(parts) > 2 else own
    want, depth = _signature(vit), len(getattr(vit, "blocks", ()))
    for name in sorted(timm.list_models(family), key=lambda n: (n != own, n)):
        try:
            candidate = timm.create_model(name, pretrained=False, num_classes=vit.num_classes, depth=depth,
                                          device="meta")
        except Exception:       # a family member that cannot be built at this depth is not this model
            continue
        if _signature(candidate) == want:
            return name
    return own


def hub_model(student) -> nn.Module:
    """The student's encoder as a new timm model of its own architecture (``architecture``, with
    timm's record of its model arguments) holding its weights, loaded strictly; no classifier."""
    import timm
    vit = _vit(student)
    name, args = architecture(vit), _model_args(vit)
    with torch.random.fork_rng(devices=[]):       # the throw-away init must not move the caller's RNG
        model = timm.create_model(name, pretrained=False, **args)
    state = {k: v.detach().float().cpu() for k, v in vit.state_dict().items()}
    return load_strict(model, state, what=f"the student as timm {name!r} {args}").eval()


def find_results(roots: Iterable[str | Path], digests: Iterable[str]) -> list[dict]:
    """The evaluation records (``RESULT`` files: task, metrics, the checkpoint's sha256) under the
    folders ``roots`` whose checkpoint is one of ``digests``, each with its ``path``; by task,
    then time. Unreadable files and records of other checkpoints are passed over."""
    digests, seen, found = set(digests), set(), []
    for root in roots:
        for path in sorted(Path(root).rglob(RESULT)) if Path(root).is_dir() else ():
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(record, dict) and (record.get("checkpoint") or {}).get("sha256") in digests:
                found.append({**record, "path": str(path)})
    return sorted(found, key=lambda r: (str(r.get("task")), str(r.get("time"))))


def _teachers(cfg, run_dir: Path) -> tuple[list[dict], str | None, str]:
    """([{name, source, untrained, digest, license}], data digest, where they were read) from the run's
    store, or for an online-fresh run without one from its adapter statistics' key; digests are
    None when neither is there."""
    from store.features import FeatureStore, StoreError
    from train.online import STATS_FILE
    names = list(teacher_names(cfg))
    if cfg.data.store:
        try:
            fs = FeatureStore.open(cfg.data.store)
        except (StoreError, OSError, ValueError) as error:
            where = f"the store {cfg.data.store} could not be opened ({str(error).splitlines()[0]})"
        else:
            teachers = [{"name": n, "source": c["source"], "untrained": c["untrained"],
                         "digest": c["checkpoint_digest"], "license": with_defaults(c)["descriptor"]["license"]}
                        for n in names for c in [fs.teacher(n).config]]
            return teachers, fs.data_digest, f"the store {cfg.data.store}"
    else:
        stats = run_dir / STATS_FILE
        if stats.is_file():
            import numpy as np
            with np.load(stats) as f:
                key = json.loads(str(f["key"]))
            teachers = [{"name": n, "source": cfg.data.teachers_from,
                         "untrained": cfg.data.teachers_from == "random-init", "digest": key["teachers"].get(n),
                         "license": descriptor(n).license} for n in names]
            return teachers, key.get("data"), f"the run's {STATS_FILE}"
        where = f"no store and no {stats}"
    return [{"name": n, "source": None, "untrained": None, "digest": None, "license": descriptor(n).license}
            for n in names], None, where


def card_license(teachers: list[dict], *, imagenet: bool) -> tuple[str, str]:
    """(the card's licence id, its sentence): the most restrictive licence of the trained teachers'
    weights (an untrained teacher carries none), "other" when none is known; the sentence names
    each teacher's and, for ImageNet data, its terms."""
    trained = [t for t in teachers if not t["untrained"]]
    lic = most_restrictive(t["license"] for t in trained) or "other"
    text = (f"{lic}: the most restrictive licence of the teachers' weights ("
            + ", ".join(f"{t['name']} {t['license']}" for t in trained) + ")" if trained else
            "other: no licence of teacher weights applies (the teachers are untrained)")
    if imagenet:
        text += f"; trained on ImageNet: {IMAGENET_TERMS}"
    return lic, text + "; the training images' own terms apply too"


def is_imagenet(images) -> bool:
    """Whether the packed image set ``images`` (a folder) is ImageNet: 1000 classes named by WordNet
    ids (n01440764, ...), as ILSVRC-2012's folders and classes.txt are."""
    from data.shards import ImageSet
    try:
        classes = ImageSet.open(images).classes
    except (OSError, ValueError):
        return False
    return len(classes) == 1000 and all(len(c) == 9 and c[0] == "n" and c[1:].isdigit() for c in classes)


def _metric_text(metrics: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def model_card(*, model: nn.Module, cfg, checkpoint: Mapping, run_dir: Path, results: list[dict],
               searched: Iterable[str | Path], out_name: str) -> dict:
    """The model card as timm's ``generate_readme`` (and ``push_to_hf_hub``) take it: tags,
    description, details (architecture, teachers and their checkpoint digests, the data digest,
    the steps, the last logged loss, the evaluations found) and usage."""
    name = model.pretrained_cfg["architecture"]
    teachers, data_digest, where = _teachers(cfg, run_dir)
    lic, lic_text = card_license(teachers, imagenet=is_imagenet(cfg.data.images))
    meta = checkpoint.get("meta", {})
    rows = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    last = next((r for r in reversed(rows) if "loss" in r), None)

    def teacher_text(t: dict) -> str:
        if t["digest"] is None:
            return f"checkpoint digest unknown ({where})"
        kind = "untrained (random init)" if t["untrained"] else f"checkpoint {t['source']}"
        return f"{kind}, sha256 {t['digest']}"

    args = _model_args(model)
    evaluations = {f"{r.get('task')} ({r['path']})": _metric_text(r.get("metrics") or {}) for r in results} or (
        "none found: no evaluation record (" + RESULT + ") of this student's weights under "
        + ", ".join(str(s) for s in searched) + "; run `python cli.py eval ... --checkpoint "
        + f"{run_dir / STUDENT_FILE}` (or on this folder's {WEIGHTS}) and export again, or point "
        "--results at the folders the evaluations wrote to")
    return {
        "tags": [TASK, "timm", "comad", "knowledge-distillation"],
        "license": lic,
        "description": (f"A {name} image encoder (no classifier) distilled with CoMAD ({PAPER}) from the "
                        f"frozen teachers {', '.join(t['name'] for t in teachers)}: "
                        f"`python cli.py export` of the run {run_dir.name}."),
        "details": {
            "Model Type": "Image feature backbone",
            "Architecture": f"{name}, " + ", ".join(f"{k} {args[k]}" for k in ("embed_dim", "depth", "num_heads")
                                                     if k in args),
            "Params (M)": f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}",
            "Image size": f"{SIZE} x {SIZE}",
            "Teachers": {t["name"]: teacher_text(t) for t in teachers},
            "Training data": (f"prepare digest sha256 {data_digest}" if data_digest
                              else f"digest unknown ({where})"),
            "Training": (f"{checkpoint.get('step')} of {meta.get('total_steps')} steps, batch "
                         f"{cfg.train.batch_size}, data.source {cfg.data.source}, git commit "
                         f"{meta.get('git_commit')}"),
            "Last logged training loss": (f"{last['loss']:.4f} at step {last.get('step')}" if last else "none logged"),
            "Evaluations": evaluations,
            "License": lic_text,
        },
        "usage": ("```python\nimport timm\n"
                  f"model = timm.create_model('local-dir:{out_name}', pretrained=True)  # or 'hf-hub:<repo>'\n"
                  "config = timm.data.resolve_data_config({}, model=model)\n"
                  "features = model.forward_features(timm.data.create_transform(**config)(image)[None])\n```"),
    }


def _load_student(run_dir: Path):
    """(config, checkpoint, student) of the run in ``run_dir``: its student rebuilt from RUN/last.pt."""
    from train.config import Config
    from train.objective import build_objective
    ck_path = run_dir / "last.pt"
    if not ck_path.exists():
        raise FileNotFoundError(f"{run_dir}: no checkpoint (last.pt) to export")
    ck = load_checkpoint(ck_path)
    cfg = Config.from_dict(ck["meta"]["config"])
    objective = build_objective(cfg, None)
    load_strict(objective.student_side(), ck["model"], what=f"checkpoint {ck_path}")
    return cfg, ck, objective.student


def _staging(out: Path) -> Path:
    """An empty folder beside ``out`` to write the export into; ``out`` itself must be absent or
    an earlier export (only ``FOLDER_FILES``), never a folder of other files."""
    if out.exists():
        other = sorted(p.name for p in out.iterdir()) if out.is_dir() else [out.name]
        if not out.is_dir() or set(other) - set(FOLDER_FILES):
            raise FileExistsError(f"{out}: exists and is not an export folder (holds {', '.join(other[:5])}); "
                                  "give a new OUT")
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _hub_config(card: Mapping | None) -> dict:
    """config.json's extra record: ``HUB_CONFIG`` with the card's licence."""
    return {"pretrained_cfg": {**HUB_CONFIG["pretrained_cfg"], "license": (card or {}).get("license", "other")}}


def _save_folder(model: nn.Module, folder: Path) -> None:
    from timm.models import save_for_hf
    save_for_hf(model, folder, safe_serialization=True, data_config=DATA_CONFIG, model_config=HUB_CONFIG)


def push(model: nn.Module, repo: str, card: Mapping) -> str:
    """Publish ``model`` with ``card`` to the Hugging Face hub repository ``repo`` (timm's
    ``push_to_hf_hub``, which writes what ``_save_folder`` writes); any failure (no network, no
    token, no permission) is one OSError line naming the repository."""
    from timm.models import push_to_hf_hub
    try:
        return str(push_to_hf_hub(model, repo, model_card=dict(card), safe_serialization=True, task_name=TASK,
                                  data_config=DATA_CONFIG, model_config=_hub_config(card)))
    except Exception as error:      # network, authentication and hub errors come in many types
        detail = (str(error).strip().splitlines() or [""])[0]
        raise OSError(f"--push-to-hub {repo}: the push failed ({type(error).__name__}: {detail}); "
                      f"the folder is written, push it later with huggingface_hub") from None


def export_run(run_dir, out, *, results: Iterable[str | Path] | None = None, push_to_hub: str | None = None) -> Path:
    """Export the student of ``run_dir`` to ``out`` (see the module docstring): one file when
    ``out`` ends in ``.safetensors``, else the folder. ``results``: folders searched for the
    student's evaluation records (default: ``EVAL_ROOT``; the run folder always). Returns ``out``."""
    from timm.models._hub import generate_readme      # what push_to_hf_hub writes as README.md
    run_dir, out = Path(run_dir), Path(out)
    if out.suffix == ".safetensors" and push_to_hub:
        raise ValueError(f"--push-to-hub publishes the folder form: give an OUT without .safetensors, not {out}")
    cfg, ck, student = _load_student(run_dir)
    if out.suffix == ".safetensors":
        return export_student(student, out)
    model = hub_model(student)
    tmp = _staging(out)
    try:
        _save_folder(model, tmp)
        # the student's weights as an evaluation may have read them: this folder's, the single file's
        digests = {sha256_file(tmp / WEIGHTS), hashlib.sha256(student_file(student)).hexdigest()}
        if (run_dir / STUDENT_FILE).is_file():
            digests.add(sha256_file(run_dir / STUDENT_FILE))
        searched = [*(results or [EVAL_ROOT]), run_dir]
        card = model_card(model=model, cfg=cfg, checkpoint=ck, run_dir=run_dir, searched=searched,
                          results=find_results(searched, digests), out_name=str(out))
        (tmp / CARD).write_text(generate_readme(card, out.name, task_name=TASK), encoding="utf-8")
        config = json.loads((tmp / CONFIG).read_text())    # config.json carries the card's licence too
        config.setdefault("pretrained_cfg", {})["license"] = card["license"]
        (tmp / CONFIG).write_text(json.dumps(config, indent=4), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if push_to_hub:
        push(model, push_to_hub, card)
    return out
