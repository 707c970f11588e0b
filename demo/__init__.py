"""The demo: the whole product on the bundled photos in a few minutes, and a report of what it
did (`python cli.py demo`). ``pipeline`` runs the stages, ``stages`` holds their work and the
settings, ``report`` writes the report. Above the library: nothing in store/, extract/,
train/ or eval/ imports it."""
