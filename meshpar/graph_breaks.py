"""Functions torch.compile must run as written - the collectives (the ledger records each
call; the compiled code is the compute between them) and ring attention - marked here.

`torch.compiler.disable` imports dynamo, about a second of every process's start, and
most of meshpar's processes never compile. Nothing can be traced before dynamo is
imported, so a marked function stays plain until then: the moment `torch._dynamo` is
first imported (by torch.compile or anything else), every marked function is replaced in
its module by its disabled form. Callers reach them through the module (`comm.all_reduce`)
or its globals, so they see the replacement."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_marked: list[tuple[str, str]] = []  # (module, name)


def graph_break(fn):
    """Mark `fn` (a module-level function) to run outside compiled code, recursively."""
    if "torch._dynamo" in sys.modules:
        return _disabled(fn)
    _marked.append((fn.__module__, fn.__name__))
    return fn


def _disabled(fn):
    """torch.compiler.disable(fn) - called while torch._dynamo finishes importing, before
    `torch` has the attribute, hence the module from sys.modules."""
    return sys.modules["torch._dynamo"].disable(fn, recursive=True)


def _disable_marked() -> None:
    for module, name in _marked:
        setattr(sys.modules[module], name, _disabled(getattr(sys.modules[module], name)))
    _marked.clear()


class _WhenDynamoIsImported(importlib.abc.MetaPathFinder):
    """Runs `_disable_marked` right after `torch._dynamo` executes."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch._dynamo":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _disable_marked()
        spec.loader.exec_module = exec_module
        return spec


if "torch._dynamo" not in sys.modules:
    sys.meta_path.insert(0, _WhenDynamoIsImported())
