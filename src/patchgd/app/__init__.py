"""The training application: Lightning task, data modules, callbacks and the CLI."""
