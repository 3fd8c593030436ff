"""Plugins, read without running them: a recipe's ``use "..."`` lines -> declared components.

    use "my_components.py"        a file, relative to the recipe's folder
    use "my_pkg.components"       an importable module (found, not imported)

The module's source is parsed with Python's ``ast``; every function decorated with
``@component(kind, name, ...)`` (``hpt_dsl.plugin``) becomes a ``Declared`` component with
its parameters taken from the function's signature (after the kind's fixed arguments; a
parameter with a default is optional) and its declared properties from the decorator's
literal keyword arguments. Nothing is executed and torch is never imported: the checker
gains the plugin's vocabulary, ``compile`` and ``run`` import the module later
(``hpt_dsl.estimator.plugins``).
"""

from __future__ import annotations

import ast as pyast
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpt_dsl.plugin import FIXED, KINDS

PROPERTIES = {"meaning", "formula", "ranges", "needs", "upge", "zero_at_zero_adv", "scope", "weights", "source"}
NEEDS = ("old_logprobs", "ref_model", "critic", "entropy")
KEY_OF = {"mask": "mask", "denom": "denom", "adv": "adv", "grad": "grad", "agg": "agg", "kl": "kl"}
"""Plugin kinds that are estimator components (the others: stat, reward)."""


class PluginError(Exception):
    """A plugin that cannot be read; the message says what and how to fix it."""


@dataclass(frozen=True)
class Declared:
    """One component a plugin declares."""

    kind: str
    name: str
    function: str
    params: tuple[str, ...]
    required: int
    props: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    line: int = 0

    @property
    def arity(self) -> tuple[int, ...]:
        return tuple(range(self.required, len(self.params) + 1))


@dataclass(frozen=True)
class Plugin:
    """A plugin module: where it is, how to import it, and what it declares."""

    target: str
    path: str
    module: str | None
    components: tuple[Declared, ...]

    def summary(self) -> str:
        parts = [f"{d.kind}={d.name}" for d in self.components]
        return f"{self.target} ({', '.join(parts) or 'no components'})"


def locate(target: str, base: Path) -> tuple[str, str | None]:
    """(file path, importable module name or None) of a ``use`` target."""
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = (base / target).resolve() if not Path(target).is_absolute() else Path(target)
        if not path.is_file():
            raise PluginError(f"plugin file '{target}' not found (looked in {base})")
        return str(path), None
    if not all(part.isidentifier() for part in target.split(".")):
        raise PluginError(f"'{target}' is neither a .py file nor a module name such as my_pkg.components")
    try:
        spec = importlib.util.find_spec(target)
    except (ImportError, ValueError) as e:
        raise PluginError(f"plugin module '{target}' cannot be found: {e}") from None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise PluginError(f"plugin module '{target}' not found on the Python path (a .py source is needed)")
    return spec.origin, target


def read(target: str, base: Path) -> Plugin:
    """The plugin ``target`` (see the module docstring); raises PluginError."""
    path, module = locate(target, base)
    try:
        source = Path(path).read_text(encoding="utf-8")
        tree = pyast.parse(source, filename=path)
    except (OSError, UnicodeDecodeError) as e:
        raise PluginError(f"plugin '{target}' cannot be read: {e}") from None
    except SyntaxError as e:
        raise PluginError(f"plugin '{target}' has a syntax error at line {e.lineno}: {e.msg}") from None
    found: list[Declared] = []
    for node in tree.body:
        if isinstance(node, pyast.FunctionDef | pyast.AsyncFunctionDef):
            for deco in node.decorator_list:
                if _is_component_call(deco):
                    found.append(_declared(node, deco, target))  # type: ignore[arg-type]
    seen: set[tuple[str, str]] = set()
    for d in found:
        if (d.kind, d.name) in seen:
            raise PluginError(f"plugin '{target}' declares {d.kind}={d.name} twice (line {d.line})")
        seen.add((d.kind, d.name))
    if not found:
        raise PluginError(
            f"plugin '{target}' declares no component: decorate its functions with "
            "@component(kind, name, ...) from hpt_dsl.plugin"
        )
    return Plugin(target, path, module, tuple(found))


def _is_component_call(node: pyast.expr) -> bool:
    if not isinstance(node, pyast.Call):
        return False
    f = node.func
    return (isinstance(f, pyast.Name) and f.id == "component") or (
        isinstance(f, pyast.Attribute) and f.attr == "component"
    )


def _declared(fn: pyast.FunctionDef, call: pyast.Call, target: str) -> Declared:
    where = f"plugin '{target}', line {call.lineno}"
    try:
        args = [pyast.literal_eval(a) for a in call.args]
        props = {k.arg: pyast.literal_eval(k.value) for k in call.keywords if k.arg is not None}
    except ValueError:
        raise PluginError(
            f"{where}: the arguments of @component must be literals (strings, numbers, lists, dicts), "
            "so that the checker can read them without running the plugin"
        ) from None
    if len(args) != 2 or not all(isinstance(a, str) for a in args):
        raise PluginError(f"{where}: write @component(kind, name, ...) with two strings")
    kind, name = args
    if kind not in KINDS:
        raise PluginError(f"{where}: unknown kind '{kind}'; the kinds are {', '.join(KINDS)}")
    if not name.isidentifier():
        raise PluginError(f"{where}: the name '{name}' must be a word (letters, digits and '_')")
    unknown = set(props) - PROPERTIES
    if unknown:
        raise PluginError(f"{where}: unknown declaration {sorted(unknown)}; known: {sorted(PROPERTIES)}")
    names = [a.arg for a in fn.args.posonlyargs + fn.args.args]
    if fn.args.vararg is not None or fn.args.kwonlyargs:
        raise PluginError(f"{where}: {fn.name} must take plain positional parameters (no *args, no keyword-only)")
    fixed = FIXED[kind]
    if len(names) < fixed:
        raise PluginError(
            f"{where}: a {kind} function takes {fixed} leading argument(s) before its parameters "
            f"(see hpt_dsl.plugin); {fn.name} takes {len(names)}"
        )
    params = tuple(names[fixed:])
    n_defaults = len(fn.args.defaults)
    required = max(0, len(params) - n_defaults)
    if kind == "kl":  # the language writes kl=name(coef); the function sees only d
        params, required = ("coef",), 1
    if kind in ("denom",) and params:
        raise PluginError(f"{where}: a denom takes no parameters (f(t) only)")
    _check_props(props, params, where)
    return Declared(kind, name, fn.name, params, required, props, call.lineno)


def _check_props(props: dict[str, Any], params: tuple[str, ...], where: str) -> None:
    for key in ("meaning", "formula", "source"):
        if key in props and not isinstance(props[key], str):
            raise PluginError(f"{where}: {key} must be a string")
    ranges = props.get("ranges", {})
    if not isinstance(ranges, dict):
        raise PluginError(f"{where}: ranges must be a dict such as {{'eps': (0, 1)}}")
    for pname, rng in ranges.items():
        if pname not in params:
            raise PluginError(
                f"{where}: ranges names the parameter '{pname}', which the function does not have "
                f"(its parameters: {', '.join(params) or 'none'})"
            )
        if not (isinstance(rng, list | tuple) and len(rng) == 2 and all(isinstance(x, int | float) for x in rng)):
            raise PluginError(f"{where}: the range of '{pname}' must be (low, high)")
    needs = props.get("needs", ())
    if isinstance(needs, str) or not all(n in NEEDS for n in needs):
        raise PluginError(f"{where}: needs must list some of {', '.join(NEEDS)}")
    if props.get("scope", "question") not in ("question", "batch"):
        raise PluginError(f"{where}: scope is 'question' or 'batch'")
    if props.get("weights", "tokens") not in ("tokens", "rows", "constant"):
        raise PluginError(f"{where}: weights is 'tokens', 'rows' or 'constant'")


def range_check(d: Declared) -> Any:
    """The checker's range check for a declared component's arguments (None: no ranges)."""
    ranges = d.props.get("ranges") or {}
    if not ranges:
        return None

    def check(args: tuple[float, ...]) -> tuple[int, str] | None:
        for i, (pname, x) in enumerate(zip(d.params, args, strict=False)):
            if pname in ranges:
                lo, hi = ranges[pname]
                if not (lo < x < hi) or not math.isfinite(x):
                    return i, f"must be in ({lo}, {hi})"
        return None

    return check


# ----- what the checker gains -------------------------------------------------------------------


def load(module: Any, label: str, sink: Any) -> tuple[Plugin, ...] | None:
    """The plugins of a parsed recipe's ``use`` lines, each error reported at its line
    (E050); None when any failed. ``label`` is the recipe's path (plugin files are found
    beside it) or '<recipe>' (then in the working folder)."""
    from hpt_dsl.lang import ast
    from hpt_dsl.lang.components import VOCAB
    from hpt_dsl.recipe import STATS

    base = Path(label).resolve().parent if label not in ("<recipe>", "") and Path(label).exists() else Path.cwd()
    out: list[Plugin] = []
    ok = True
    for stmt in module.stmts:
        if not isinstance(stmt, ast.Use):
            continue
        try:
            plugin = read(stmt.target, base)
            for d in plugin.components:
                key = KEY_OF.get(d.kind)
                clash = (key is not None and d.name in VOCAB[key]) or (d.kind == "stat" and d.name in STATS) or (
                    d.kind == "reward" and d.name in ("boxed", "math_verify"))  # fmt: skip
                if clash:
                    raise PluginError(
                        f"plugin '{stmt.target}' declares {d.kind}={d.name}, a built-in name; choose another"
                    )
                for other in out:
                    if any((o.kind, o.name) == (d.kind, d.name) for o in other.components):
                        raise PluginError(f"{d.kind}={d.name} is declared by both '{other.target}' and '{stmt.target}'")
            out.append(plugin)
        except PluginError as e:
            ok = False
            sink.error("E050", str(e), stmt.pos, hint="a plugin is a .py file (beside the recipe) or a module "
                       "whose functions carry @component(kind, name, ...) from hpt_dsl.plugin")  # fmt: skip
    return tuple(out) if ok else None


def vocabulary(found: tuple[Plugin, ...]) -> tuple[dict[str, dict[str, Any]], tuple[str, ...]]:
    """The checker's component vocabulary and statistics, with the plugins' added."""
    from hpt_dsl.lang.components import VOCAB, Form
    from hpt_dsl.recipe import STATS

    if not found:
        return VOCAB, STATS
    vocab = {key: dict(forms) for key, forms in VOCAB.items()}
    stats = list(STATS)
    for plugin in found:
        for d in plugin.components:
            key = KEY_OF.get(d.kind)
            if key is not None:
                arity = d.arity if d.params else (0,)
                vocab[key][d.name] = Form(
                    d.name, arity, d.params, d.props.get("meaning", f"from plugin {plugin.target}"),
                    d.props.get("formula", ""), range_check(d), d.props.get("source", f"plugin {plugin.target}"),
                )  # fmt: skip
            elif d.kind == "stat":
                stats.append(d.name)
    return vocab, tuple(stats)


def with_rewards(settings: Any, found: tuple[Plugin, ...]) -> Any:
    """Settings whose data.reward / eval.reward name a plugin's reward, as its import path."""
    paths = {
        d.name: f"{p.module}:{d.function}" if p.module else f"{p.path}:{d.function}"
        for p in found
        for d in p.components
        if d.kind == "reward"
    }
    if not paths:
        return settings
    data = settings.data.model_copy(update={"reward": paths.get(settings.data.reward, settings.data.reward)})
    ev = settings.eval
    if ev.reward in paths:
        ev = ev.model_copy(update={"reward": paths[ev.reward]})
    return settings.model_copy(update={"data": data, "eval": ev})
