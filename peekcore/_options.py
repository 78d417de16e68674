"""Keyword options that several public functions share, listed once.

A frozen dataclass that subclasses :class:`SharedOptions` lists the options:
name, type and default, and its docstring says where they are described. A
function decorated with ``Options.shown_in()`` takes them as ``**options``,
while its signature (what ``help()`` and ``inspect.signature`` show) lists each
as a keyword-only parameter with its default; ``Options.given_to(func,
options)`` turns a call's ``**options`` into one instance, refusing a name that
is no option as Python refuses a wrong keyword. ``capture`` and
``ModelSource`` share :class:`peekcore.capture.options.CaptureOptions` so;
``component_importance`` and ``edited_outputs`` share
:class:`peekcore.edits.EditOptions`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from .errors import InvalidTypeError

__all__ = ["SharedOptions"]

_F = TypeVar("_F", bound=Callable)
_O = TypeVar("_O", bound="SharedOptions")


class SharedOptions:
    """Base of a frozen dataclass of keyword options shared by several functions."""

    @classmethod
    def shown_in(cls, **defaults: Any) -> Callable[[_F], _F]:
        """A decorator: show a function's ``**options`` as this class's fields.

        The decorated function's ``__signature__`` lists each field as a
        keyword-only parameter (in place of its ``**options``, before its own
        keyword-only parameters) with its default, ``defaults`` overriding the
        class's; :meth:`given_to` reads the defaults back from there.

        Parameters
        ----------
        **defaults
            Defaults of this function that differ from the class's
            (``ModelSource`` yields float32, say).
        """
        fields = dataclasses.fields(cls)
        unknown = set(defaults) - {f.name for f in fields}
        if unknown:  # pragma: no cover - a programming error in peekcore
            raise InvalidTypeError(f"no {cls.__name__} fields {sorted(unknown)}")
        kw = inspect.Parameter.KEYWORD_ONLY
        shown = [
            inspect.Parameter(
                f.name, kw, default=defaults.get(f.name, f.default), annotation=f.type
            )
            for f in fields
        ]

        def decorate(func: _F) -> _F:
            sig = inspect.signature(func)
            params = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
            at = next((i for i, p in enumerate(params) if p.kind == kw), len(params))
            func.__signature__ = sig.replace(parameters=[*params[:at], *shown, *params[at:]])
            return func

        return decorate

    @classmethod
    def given_to(cls: type[_O], func: Callable, options: Mapping[str, Any]) -> _O:
        """The options a call of ``func`` (decorated by :meth:`shown_in`) got as
        ``**options``; the others at the defaults its signature shows.

        Raises
        ------
        InvalidTypeError
            For a name that is no option, as Python says it of a wrong keyword.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(names))
        shown = inspect.signature(func).parameters
        if unknown:
            # every keyword the function takes, its own too (a typo of ``sweeps`` or
            # ``overwrite`` must find the right name in the list)
            keywords = [n for n, p in shown.items() if p.kind == p.KEYWORD_ONLY]
            raise InvalidTypeError(
                f"{func.__qualname__}() got an unexpected keyword argument {unknown[0]!r}; "
                f"its keyword arguments are: {', '.join(keywords)}"
            )
        return cls(**{n: options[n] if n in options else shown[n].default for n in names})
