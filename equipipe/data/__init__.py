"""Datasets: one package per dataset (:mod:`.spice`, :mod:`.pdb`, :mod:`.geom`), the downloader
(:mod:`.download`), where downloads land (:mod:`.landing`), the embedded builders' shared parts
(:mod:`.embedded`), splits, clustering and the restricted pickle loaders."""
