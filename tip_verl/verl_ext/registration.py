"""Register our names in verl's registries when verl imports the registry, not when it imports `verl`.

verl loads our `verl.plugins` entry point in every process that imports verl: the driver, every Ray
worker, every rollout and teacher server. Most of them never look up an estimator, a trainer or a
distillation loss, and the modules holding those registries are expensive (importing core_algos, the
distillation losses and the V1 trainer stack costs seconds and ~150 MB per process). Each registry is
a plain dict that verl reads only after importing the module that defines it, so our names only need
to be in it by the time that module has finished executing:

    verl module (defines the registry)   our module (registers on import)   names
    verl.trainer.ppo.core_algos          tip_verl.verl_ext.estimator        tip_opd
    verl.trainer.distillation.losses     tip_verl.verl_ext.losses           tip_k3, ..., tip_*_topk
    verl.trainer.ppo.v1                  tip_verl.verl_ext.trainer          tip_sync

The trainer waits for the package `verl.trainer.ppo.v1` rather than its `trainer_base`: importing
`trainer_base` (where `get_trainer_cls` lives) always runs the package first, and once the package has
run, `PPOTrainerSync` (our base class) is complete.

Python has no post-import hook, so `register_when_verl_imports` puts a finder first on `sys.meta_path`
that answers for those three module names only: it asks the other finders for verl's spec and wraps
its loader so that our module is imported right after verl's has executed. Every other import is
untouched. A verl module already imported when this runs gets our names at once.

A registration that fails (e.g. tip-verl and verl out of step) leaves verl's module working and warns,
naming the fix, instead of surfacing later as "Unknown trainer 'tip_sync'".
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

REGISTRATIONS = {  # verl module: (our module, what it registers)
    "verl.trainer.ppo.core_algos": ("tip_verl.verl_ext.estimator", "the advantage estimator tip_opd"),
    "verl.trainer.distillation.losses": ("tip_verl.verl_ext.losses", "the tip_* distillation losses"),
    "verl.trainer.ppo.v1": ("tip_verl.verl_ext.trainer", "the trainer mode tip_sync"),
}
FIX = "reinstall tip-verl next to verl 0.9.1 on this node and run `tip-verl doctor`"


def warn_not_registered(what: str, error: BaseException) -> None:
    """A warning on stderr, category RuntimeWarning (verl logs a plugin that fails to load at DEBUG only)."""
    warnings.warn(f"tip-verl: {what} failed ({error!r}); {FIX}.", RuntimeWarning, stacklevel=2)


def register(our_module: str, names: str) -> None:
    try:
        importlib.import_module(our_module)
    except Exception as error:
        warn_not_registered(f"registering {names} with verl (import of {our_module})", error)


class _RegisterAfterExec(importlib.abc.Loader):
    """verl's own loader for one module, followed by the import of the module registering our names."""

    def __init__(self, loader: importlib.abc.Loader, registration: tuple[str, str]):
        self.loader, self.registration = loader, registration

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        register(*self.registration)

    def __getattr__(self, name):  # get_source, get_resource_reader, ...: verl's loader answers
        return getattr(self.loader, name)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, pending: dict[str, tuple[str, str]]):
        self.pending = pending

    def find_spec(self, fullname, path, target=None):
        registration = self.pending.pop(fullname, None)
        if registration is None:
            return None
        spec = importlib.util.find_spec(fullname)  # the other finders: this one no longer answers for it
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterExec(spec.loader, registration)
        return spec


def register_when_verl_imports() -> None:
    """Register each group of names when verl's registry module is imported (at once if it already is)."""
    pending = {}
    for verl_module, registration in REGISTRATIONS.items():
        if verl_module in sys.modules:
            register(*registration)
        else:
            pending[verl_module] = registration
    if pending:
        sys.meta_path.insert(0, _RegisterOnImport(pending))
