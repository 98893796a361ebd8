"""config/paper.yaml plans EScAIP as upstream has it, the ablation against the CPU-scale form,
and the authors' batch sizes of the data-size runs (issue 11 item 4) — read from the dry run's
own training parameters, not from the YAML."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from equipipe.models.escaip import config_for
from tests.test_workflow import planned_jobs, snakemake

ROOT = Path(__file__).resolve().parent.parent
ESCAIP = ["escaip_default", "escaip_50k", "escaip_5k", "escaip_500", "escaip_1M", "escaip_4M",
          "escaip_adam_1e-4", "escaip_adam_1e-3", "escaip_sgd_1e-5", "escaip_aug"]  # fmt: skip


def test_paper_plan_has_the_upstream_form_the_ablation_and_the_batch_sizes(tmp_path):
    shutil.copy(ROOT / "config" / "paper.yaml", tmp_path / "config.yaml")
    runs = [*ESCAIP, "escaip_cpu_form"]
    targets = [f"results/runs/{e}/seed0/run.json" for e in runs]
    out = snakemake(tmp_path, "-n", "-p", "--", *targets, "results/figures/escaip_pct_form.png")
    assert planned_jobs(out)["train"] == len(runs) + 2  # escaip_default's seeds 1, 2 for the figure
    specs = {}
    for line in out.stdout.splitlines():
        m = re.search(r"equipipe train --spec @(\S+) .* --out results/runs/(\w[\w.-]*)/seed0", line)
        if m:
            specs[m.group(2)] = json.loads((tmp_path / m.group(1)).read_text())
    assert set(runs) <= set(specs)
    for exp, spec in specs.items():
        form = spec["task_cfg"].get("model_overrides", {}).get("form")
        assert form == ("cpu" if exp == "escaip_cpu_form" else "upstream"), exp
        cfg = config_for(spec["size"], **spec["task_cfg"]["model_overrides"])
        assert cfg.get("magnitude") == ("softplus" if form == "cpu" else "linear")
    batch = {e: specs[e]["train"]["batch_size"] for e in ("escaip_50k", "escaip_5k", "escaip_500")}
    assert batch == {"escaip_50k": 64, "escaip_5k": 64, "escaip_500": 1}
    assert specs["escaip_default"]["train"]["batch_size"] == 64
