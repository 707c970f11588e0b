"""The bottom layer: what every long job shares (typed configs, run folders, checkpoints,
schedules, optimiser groups, strict state-dict loading). Imports no other package of the project."""
