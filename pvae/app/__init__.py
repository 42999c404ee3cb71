"""The application layer: the ``pvae`` command line (:mod:`pvae.app.cli`), its commands
(:mod:`pvae.app.compare`, :mod:`pvae.app.diagnose`; ``train`` and ``datasets`` live in the
CLI), run folders and their :class:`~pvae.app.runs.RunConfig` (:mod:`pvae.app.runs`), and the
registries of models and engines (:mod:`pvae.app.registry`).

Core modules never import this package: it sits above the models and the engines.
"""
