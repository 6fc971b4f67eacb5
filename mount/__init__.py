"""The daemon: command line, mounting, signals and stale-mount recovery."""
