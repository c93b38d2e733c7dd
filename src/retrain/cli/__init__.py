"""The `retrain` console command: one entry point, a subcommand for each tool (registry, report, sweeps, data)."""
