"""Train a super-resolution model by Wald's protocol on the training scenes:
``python -m onboard.models.superres.train x2|sharpen [--minutes M]``.

L1 loss on reflectance (DSen2's choice: robust to the odd saturated pixel), Adam with a cosine
decay over a wall-clock budget, since the machine is shared and a run must stay short.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from onboard.models.data import default_data_root
from onboard.models.superres import dataset
from onboard.models.superres.model import build_sharpen, build_x2, count_parameters

HERE = Path(__file__).resolve().parent
WEIGHTS = {"x2": HERE / "weights_x2.pt", "sharpen": HERE / "weights_sharpen.pt"}
PATCH = {"x2": 48, "sharpen": 64}  # input pixels: the ×2 target is twice that


def train(task: str, minutes: float, root: Path, out: Path, batch: int = 16, lr: float = 1e-3,
          seed: int = 0, threads: int = 1, log_every: int = 100, patch: int | None = None,
          init: Path | None = None, hold: tuple[str, ...] = (),
          depth: int | None = None) -> dict[str, Any]:
    """Train for ``minutes`` of wall time; ``init`` continues from earlier weights (a second
    round on this shared machine, with its own seed and schedule; 0.1's unguided sharpening
    weights grow into the guided model). ``hold`` keeps places out of this round, to check it
    against the weights it started from."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    model = build_x2(depth) if task == "x2" else build_sharpen()
    history: list[dict[str, Any]] = []
    if init is not None:
        state = torch.load(init, map_location="cpu", weights_only=True)
        if task == "sharpen" and "detail_share" not in state:
            model.load_unguided(state)
        elif task == "x2" and len(state) < len(model.state_dict()):
            model.load_shallower(state)
        else:
            model.load_state_dict(state)
        previous = Path(init).with_suffix(".json")
        if previous.exists():
            loaded = json.loads(previous.read_text())
            history = loaded.pop("history", []) + [loaded]
    patch = patch or PATCH[task]
    scenes = [s for s in dataset.training_scenes(root) if dataset.place(s.name) not in hold]
    sampler = dataset.PatchSampler(scenes, task, patch, seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    budget = minutes * 60.0
    start = time.perf_counter()
    step, running = 0, []
    while True:
        elapsed = time.perf_counter() - start
        if elapsed > budget:
            break
        # Cosine decay on wall time, so the schedule ends when the budget does.
        for group in optimiser.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(elapsed / budget, 1.0)))
        x, y = sampler.batch(batch)
        prediction = model(torch.from_numpy(x))
        loss = torch.nn.functional.l1_loss(prediction, torch.from_numpy(y))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        running.append(float(loss.detach()))
        step += 1
        if step % log_every == 0:
            print(f"{task} step {step} {elapsed:.0f}s L1 {np.mean(running) * 1e4:.1f} DN",
                  flush=True)
            running = []
    torch.save(model.state_dict(), out)
    info: dict[str, Any] = {"task": task, "steps": step,
                            "seconds": round(time.perf_counter() - start), "batch": batch,
                            "patch": patch, "lr": lr, "seed": seed,
                            "params": count_parameters(model),
                            **({"depth": model.body_depth} if task == "x2" else {}),
                            "init": str(init) if init else None, "held": list(hold),
                            "history": history}
    out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("task", choices=["x2", "sharpen"])
    parser.add_argument("--minutes", type=float, default=14.0)
    parser.add_argument("--root", type=Path, default=default_data_root())
    parser.add_argument("--out", type=Path)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patch", type=int, help="input patch size (default per task)")
    parser.add_argument("--init", type=Path, help="continue from these weights")
    parser.add_argument("--hold", action="append", default=[],
                        help="keep this place out of the round (repeatable)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--depth", type=int, help="x2: body depth (grows --init's model)")
    args = parser.parse_args()
    print(train(args.task, args.minutes, args.root, args.out or WEIGHTS[args.task], args.batch,
                args.lr, args.seed, args.threads, patch=args.patch, init=args.init,
                hold=tuple(args.hold), depth=args.depth))


if __name__ == "__main__":
    main()
