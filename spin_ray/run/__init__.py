"""The run: its driver and phases, manifest, lease, paths, training sets, evaluation, reports and tracking."""
