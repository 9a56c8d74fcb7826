"""The fixed cost of a pass through one block, in row-tokens (`pass_plan.FIXED_ROW_TOKENS`).

Times `Attributor._rows` (one forward/backward) over r rows of the demo prompts scaled at one
layer s, for several r and two start layers; the difference between the start layers divided by
the blocks between is one block's time, fitted as a + b x (row-tokens): FIXED = a / b.

    PYTHONPATH=. python benchmarks/pass_cost.py --model smollm2
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from kn_ray.engine import Attributor, load_model
from kn_ray.engine.random_models import PRESETS, random_model

from steady_state import demo_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--rows", default="1,4,16,64,256")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.model in PRESETS:
        lm = random_model(args.model, [" ".join(demo_prompts(m)[0] + demo_prompts(m)[1]) for m in (False, True)])
    else:
        lm = load_model(args.model, precision="fp32")
    attr = Attributor(lm, precision="fp32", max_batch_tokens=10**6)
    prompts, targets = demo_prompts(lm.adapter.masked)
    _, _, ready, _ = attr._prepare(prompts, targets)
    length = len(ready[0][1].object_ids)
    encs = [e for _, e in ready if len(e.object_ids) == length]
    batch = attr._collate(encs)
    clean = attr._clean_pass(batch, set(range(lm.num_layers)))
    tokens = batch.input_ids.shape[1] - batch.start_col
    lo, hi = 0, lm.num_layers - 1
    per_block = {}
    for r in (int(x) for x in args.rows.split(",")):
        pi = torch.arange(r) % batch.size
        alpha = torch.full((r,), 0.5)
        t = {}
        for s in (lo, hi):
            attr._rows(batch, clean, s, pi, alpha, 0.0)  # warm-up
            best = []
            for _ in range(args.repeats):
                cpu = time.process_time()
                attr._rows(batch, clean, s, pi, alpha, 0.0)
                best.append(time.process_time() - cpu)
            t[s] = min(best)
        per_block[r * tokens] = (t[lo] - t[hi]) / (hi - lo)
        print(json.dumps(dict(rows=r, row_tokens=r * tokens, s_from_0=round(t[lo], 4), s_from_top=round(t[hi], 4),
                              block_ms=round(1e3 * per_block[r * tokens], 3))), flush=True)
    x, y = np.array(list(per_block)), np.array(list(per_block.values()))
    b, a = np.polyfit(x, y, 1)
    print(json.dumps(dict(model=args.model, tokens_per_row=tokens, block_fixed_ms=round(1e3 * a, 3),
                          block_ms_per_row_token=round(1e3 * b, 4), fixed_row_tokens=round(a / b, 1))))


if __name__ == "__main__":
    main()
