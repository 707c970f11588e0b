"""Does Mask R-CNN on the simple feature pyramid learn? A short CPU run on the toy COCO set.

    python bench/detection_toy.py OUT [--train 32] [--epochs 4] [--roi-batch 64] [--threads 2]

Writes the toy set (``samples/toy_coco.py``) and a randomly initialised ViT-Tiny checkpoint under
OUT, runs ``eval detection`` on them (the command: docs/eval.md, "Does it learn?") and prints box
and mask AP on the 16 validation images (OUT/run/result.json)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run_toy(out: Path, *, train: int = 32, val: int = 16, epochs: int = 4, roi_batch: int = 64,
            threads: int | None = None) -> dict:
    """Make the data and checkpoint under ``out``, train and evaluate; returns the metrics (percent).
    ``roi_batch``: RoIs sampled per image (a quarter of them positive, each through the 4-conv
    mask head: most of a step's time)."""
    import timm
    import torch
    from safetensors.torch import save_file

    from cli import main
    from samples.toy_coco import make_toy_coco

    out = Path(out)
    data = make_toy_coco(out / "coco", train=train, val=val, size=128, seed=0)
    checkpoint = out / "vit_tiny_random.safetensors"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vit = timm.create_model("vit_tiny_patch16_224", num_classes=0)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(checkpoint))
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        # the backbone is untrained, so no layer decay; the jitter is narrowed so that the shapes
        # stay visible at 128 px
        main(["eval", "detection", str(data), "--checkpoint", str(checkpoint), "--out", str(out / "run"),
              "--image-size", "128", "--batch-size", "4", "--lr", "2e-4", "--layer-decay", "1.0",
              "--drop-path", "0", "--warmup", "20", "--heads", "light", "--roi-batch", str(roi_batch),
              "--scale-range", "0.8", "1.25", "--epochs", str(epochs), "--workers", "0", "--device", "cpu"],
             standalone_mode=False)
    finally:
        torch.set_num_threads(before)
    return json.loads((out / "run" / "result.json").read_text())["metrics"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="work folder (data, checkpoint, run, result)")
    parser.add_argument("--train", type=int, default=32, help="training images (default 32)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs (default 4)")
    parser.add_argument("--roi-batch", type=int, default=64, help="RoIs sampled per image (default 64)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    start = time.time()
    metrics = run_toy(args.out, train=args.train, epochs=args.epochs, roi_batch=args.roi_batch, threads=args.threads)
    print(f"box AP50 {metrics['box_AP50']:.1f}  box AP {metrics['box_AP']:.1f}  "
          f"mask AP50 {metrics['mask_AP50']:.1f}  mask AP {metrics['mask_AP']:.1f}  "
          f"in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
