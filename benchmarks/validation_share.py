"""Share of wall time validation takes at `rnca train`'s default settings on rings-train (10 % held out):
one validation round (full-size refinement and scoring) against 100 iterations.

    python benchmarks/validation_share.py
"""
import time
from pathlib import Path

import torch

from rnca_cli import train as tr
from rnca_cli.checkpoint import load_model
from rnca_cli.engines import select_engine
from rnca_cli.model import RNCA
from rnca_cli.validation import refine_cases, score

D = Path(__file__).resolve().parents[2] / "shared" / "data" / "rings-train"
config = tr.TrainConfig(val_fraction=0.1)
data = tr.load_dataset(f"{D}/images", f"{D}/labels", f"{D}/states", config)
model = load_model("rings")
t = time.perf_counter(); val = score(refine_cases(model, data.val, config.steps, config.seed), data.val); tv = time.perf_counter() - t
print(len(data.val), "val cases", round(tv, 2), "s per validation", val)
m = RNCA().train(); engine = select_engine(torch.device("cpu"), torch.float32, m)
opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
pool = tr.Pool(m, data.train, config.pool, g1)
tr.train_step(m, engine, opt, pool, config, g1, g2)
t = time.perf_counter()
for _ in range(3): tr.train_step(m, engine, opt, pool, config, g1, g2)
ti = (time.perf_counter() - t) / 3
print(round(ti, 2), "s per iteration (batch 32)", "validation share at val_every=100:", round(tv / (tv + 100 * ti) * 100, 2), "%")
