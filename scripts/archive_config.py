"""Write the validated config (defaults filled) as YAML for the report."""

import json

import yaml

cfg = snakemake.params.cfg  # noqa: F821 - injected by Snakemake
if cfg.startswith("@"):  # a content-addressed parameter file (equipipe.params)
    with open(cfg[1:]) as fh:
        cfg = fh.read()
with open(snakemake.output[0], "w") as fh:  # noqa: F821
    yaml.safe_dump(json.loads(cfg), fh, sort_keys=False)
