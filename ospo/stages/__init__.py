"""The five stages of one OSPO iteration, one module each.

Every stage module exposes the same entry point::

    def run(cfg: Config, rundir: RunDir, iteration: int, get_engine: Callable[[], Engine],
            *, force: bool = False, limit: int | None = None) -> dict

It opens its :class:`ospo.rundir.StageRun` (config check, resume ledger, crash repair),
reads its input from the iteration directory, does only the ids not yet in its ledger,
and returns the final manifest. ``get_engine()`` loads the model on first call, so bad
input fails before any model loads, and a stage fed entirely by user-supplied outputs
need not load one. Stages meet only through the run directory: a stage never imports
another stage.
"""
