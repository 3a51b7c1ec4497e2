"""Seeing a run: the ``cdam serve`` dashboard, the ``cdam report`` HTML file, ``cdam show`` figures and the
FiftyOne export. Everything reads the run through ``cdam_worker.reading.open_run``.

- ``colormap``: the diverging colour map (symmetric scale per map) and overlays;
- ``render``: the model's view of an image, tiles, placeholders, the ``show`` figure;
- ``tiles``: tiles at display size, read in batches and cached in memory;
- ``catalog``: the run as the views see it (index, overview, audit tables, gallery queries);
- ``pages``: HTML fragments shared by the dashboard and the report;
- ``guard``: who the dashboard answers (Host and Origin checks, the token);
- ``app``: the Starlette dashboard; ``report``: the static report; ``fiftyone``: the FiftyOne export.
"""
