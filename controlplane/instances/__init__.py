"""The instances (workers) this gateway may use: shared types and protocols (``types``), where the
records live (``store``), one instance (``instance``), and the registry in layers: state machine
and health (``state``), load tracking (``load``), policy and latency models (``predictors``),
and the admin backend (``registry``: :class:`~controlplane.instances.registry.InstanceRegistry`)."""
