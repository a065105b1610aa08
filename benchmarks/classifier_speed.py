"""B-scans per second of a classifier model: forward, and forward + input gradient (what LRP costs),
at batch 1 and 8, for 496×512 and 496×1024 B-scans. Measured on CUDA when available, else CPU.

Run: .venv/bin/python benchmarks/classifier_speed.py [--model MODEL_DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from hrf_batch.config import DEFAULT_MODEL, MODELS_DIR
from hrf_batch.model.files import load_model, resolve_device
from hrf_batch.model.nets import get_task


def _time(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(MODELS_DIR / DEFAULT_MODEL))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = resolve_device(args.device)
    model, info = load_model(args.model, device=str(device))
    task = get_task(info.config.task)
    print(f"{info.model_id} on {device} ({torch.get_num_threads()} CPU threads); best of {args.repeats}")
    print(f"{'input':>10} {'batch':>5} {'forward B-scans/s':>18} {'fwd+grad B-scans/s':>19} {'grad/fwd':>9}")
    for width in (512, 1024):
        for batch in (1, 8):
            x = torch.randn(batch, 1, 496, width, device=device)

            def forward() -> None:
                with torch.inference_mode():
                    model(x)

            def with_grad() -> None:
                xg = x.clone().requires_grad_(True)
                task.explain_logit(model(xg)).sum().backward()

            tf, tg = _time(forward, args.repeats, device), _time(with_grad, args.repeats, device)
            print(f"{'496x' + str(width):>10} {batch:>5} {batch / tf:>18.2f} {batch / tg:>19.2f} {tg / tf:>9.2f}")


if __name__ == "__main__":
    main()
