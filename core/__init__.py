"""The bottom layer: what every job shares (typed configs, run folders, durable files, the keyed
hash, locks, torchrun helpers, threads, expected errors, schedules, strict loading). Imports no
other package of the project."""
