"""Plugins at compile time: import the modules a recipe's ``use`` lines name and register
their ``@component`` functions, so that the compiler finds them like the built-in ones.

Each registered function keeps its declaration (``fn.declared``, ``fn.needs``) and is
wrapped so that an exception inside it names the plugin, the component and the function
(``PluginCallError``) instead of ending in a traceback deep in the loss program.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from hpt_dsl.errors import InputError
from hpt_dsl.estimator.registry import _REGISTRY
from hpt_dsl.faults import RunFault

ESTIMATOR_KINDS = ("mask", "denom", "adv", "grad", "agg", "kl", "stat")
_DECLARED_NEEDS: dict[tuple[str, str], tuple[str, ...]] = {}


class PluginLoadError(InputError):
    """A plugin that cannot be imported or does not match its declaration (exit code 2)."""


class PluginCallError(RunFault):
    """A plugin's component raised while the loss program ran it (exit code 3)."""


def declared_needs() -> dict[tuple[str, str], tuple[str, ...]]:
    """(kind, name) -> the needs every registered plugin component declares."""
    return dict(_DECLARED_NEEDS)


def import_plugins(plugins: tuple[Any, ...]) -> None:
    """Import each plugin (``hpt_dsl.lang.plugins.Plugin``) and register its components."""
    for plugin in plugins:
        module = _import(plugin)
        for d in plugin.components:
            if d.kind not in ESTIMATOR_KINDS:
                continue  # rewards are resolved by the data side from their import path
            fn = getattr(module, d.function, None)
            mark = getattr(fn, "__hpt_component__", None)
            if not callable(fn) or mark is None or mark[:2] != (d.kind, d.name):
                raise PluginLoadError(
                    f"plugin '{plugin.target}': {d.function} is not the @component({d.kind!r}, {d.name!r}) "
                    "the checker read; save the file and check again"
                )
            _register(plugin.target, d.kind, d.name, fn, mark[2])


def _import(plugin: Any) -> ModuleType:
    try:
        if plugin.module is not None:
            return importlib.import_module(plugin.module)
        name = "hpt_plugin_" + hashlib.sha1(plugin.path.encode()).hexdigest()[:12] + "_" + Path(plugin.path).stem
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, plugin.path)
        if spec is None or spec.loader is None:
            raise PluginLoadError(f"plugin '{plugin.target}' cannot be imported from {plugin.path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        return module
    except PluginLoadError:
        raise
    except Exception as e:  # the plugin's own import-time code failed
        raise PluginLoadError(f"plugin '{plugin.target}' failed to import: {type(e).__name__}: {e}") from e


def _register(target: str, kind: str, name: str, fn: Callable[..., Any], declared: dict[str, Any]) -> None:
    key = (kind, name)
    current = _REGISTRY.get(key)
    if current is not None:
        if getattr(current, "__wrapped__", None) is fn:
            return  # the same plugin compiled again
        if getattr(current, "plugin", None) is None:
            raise PluginLoadError(f"plugin '{target}': {kind}={name} is a built-in component; choose another name")
        if getattr(current, "__qualname__", None) != fn.__qualname__ or current.plugin != target:
            raise PluginLoadError(f"plugin '{target}': {kind}={name} is already defined by plugin '{current.plugin}'")

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PluginCallError:
            raise
        except Exception as e:
            raise PluginCallError(
                f"{kind}={name} (plugin '{target}', function {fn.__name__}) raised {type(e).__name__}: {e}"
            ) from e

    call.plugin = target  # type: ignore[attr-defined]
    call.declared = declared  # type: ignore[attr-defined]
    call.needs = tuple(declared.get("needs", ()))  # type: ignore[attr-defined]
    _REGISTRY[key] = call
    _DECLARED_NEEDS[key] = call.needs  # type: ignore[attr-defined]
