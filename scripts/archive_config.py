"""Write the validated config (defaults filled) as YAML for the report."""

import json

import yaml

with open(snakemake.output[0], "w") as fh:  # noqa: F821 - injected by Snakemake
    yaml.safe_dump(json.loads(snakemake.params.cfg), fh, sort_keys=False)  # noqa: F821
