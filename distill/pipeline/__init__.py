"""The stage graph: :mod:`runner` (manifests, stage keys, skip, resume, force / until) and
:mod:`stages` (the stages of the default run, one short function each, and the table that wires
them)."""
