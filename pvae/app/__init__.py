"""The application layer: the ``pvae`` command line (parsed by :mod:`pvae.app.arguments`
without torch, run by :mod:`pvae.app.cli`), its commands
(:mod:`pvae.app.compare`, :mod:`pvae.app.diagnose`; ``train`` and ``datasets`` live in the
CLI), run folders and their :class:`~pvae.app.runs.RunConfig` (:mod:`pvae.app.runs`), and the
registries of models and engines (:mod:`pvae.app.registry`; each model declares itself in a
card at the end of its own file).

Core modules never import this package: it sits above the models and the engines.
"""
