"""Name -> component registries for the two things YAML names: rewards and filters.

A YAML entry names a built-in (`answer_match`), a component an installed distribution declares
as an entry point (group `moealign.rewards` or `moealign.filters`: `pip install` a plug-in and
name it), or, for the user's own code, an explicit `module:attribute` reference
(`my_project.rewards:brevity`). The built-ins are a name -> `module:attribute` table: nothing
is imported until a name is looked up, so the core never imports the plug-in packages
(`rewards`, `filters`) and they import the core freely. Only the module a looked-up name
points to is ever imported; no other config string is evaluated or imported.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
from collections.abc import Callable
from typing import Generic, TypeVar

from align.config import ConfigError

T = TypeVar("T")


class RegistryError(ConfigError):
    """A duplicate registration, an unknown name or a plug-in reference that cannot be loaded."""


class Registry(Generic[T]):
    """Components of one kind ("reward", "filter") by name.

    Args:
        kind: what they are, in messages.
        builtins: name -> `module:attribute` of the built-in ones, imported on first lookup.
        group: the entry-point group installed distributions declare theirs in.
    """

    def __init__(
        self, kind: str, builtins: dict[str, str] | None = None, group: str | None = None
    ) -> None:
        self.kind, self.builtins, self.group = kind, dict(builtins or {}), group
        self._items: dict[str, T] = {}

    def names(self) -> list[str]:
        """Every name a lookup finds (built-in, registered, installed), sorted."""
        return sorted({*self._items, *self.builtins, *self._entry_points()})

    def _entry_points(self) -> dict[str, str]:
        """Installed distributions' components of this kind: name -> `module:attribute`."""
        if self.group is None:
            return {}
        return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=self.group)}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering a component under `name`.

        Raises:
            RegistryError: `name` is already taken; the message lists the known names.
        """

        def add(item: T) -> T:
            if name in self._items or name in self.builtins:
                raise RegistryError(
                    f"{self.kind} name {name!r} is already registered; "
                    f"known {self.kind}s: {', '.join(self.names())}"
                )
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        """The component `name` names: registered, built-in, an installed distribution's entry
        point (in that order), or the one a `module:attribute` reference names.

        Raises:
            RegistryError: unknown name (with the known names and the closest match), or a
                reference whose module or attribute cannot be found or imported.
        """
        if ":" in name:
            return self._load_plugin(name)
        if name in self._items:
            return self._items[name]
        reference = self.builtins.get(name) or self._entry_points().get(name)
        if reference is None:
            close = difflib.get_close_matches(name, self.names(), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RegistryError(
                f"unknown {self.kind} {name!r}.{hint} Known {self.kind}s: "
                f"{', '.join(self.names())}; or name your own as 'module:function'."
            )
        self._items[name] = self._load_plugin(reference)
        return self._items[name]

    def _load_plugin(self, reference: str) -> T:
        module_name, _, attribute = reference.partition(":")
        if not module_name or not attribute:
            raise RegistryError(
                f"{self.kind} reference {reference!r} must look like 'package.module:function'"
            )
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is None or not module_name.startswith(error.name):
                raise self._import_failed(module_name, reference, error) from None
            raise RegistryError(
                f"cannot import module {module_name!r} of {self.kind} {reference!r}: {error}. "
                "Is it installed, or is its directory on PYTHONPATH?"
            ) from None
        except (Exception, SystemExit) as error:
            # Whatever a plug-in's import raises (SystemExit included: a module calling
            # sys.exit(0) would otherwise end the command with success, having done nothing).
            raise self._import_failed(module_name, reference, error) from None
        try:
            item = getattr(module, attribute)
        except AttributeError:
            raise RegistryError(
                f"module {module_name!r} ({module.__file__}) has no attribute {attribute!r} "
                f"for {self.kind} {reference!r}"
            ) from None
        if not callable(item):
            raise RegistryError(f"{self.kind} {reference!r} is not callable")
        return item

    def _import_failed(self, module_name: str, reference: str, error: BaseException):
        try:
            spec = importlib.util.find_spec(module_name)
            where = f" ({spec.origin})" if spec is not None and spec.origin else ""
        except (Exception, SystemExit):
            where = ""
        lines = str(error).strip().splitlines()
        last = f"{type(error).__name__}: {lines[-1]}" if lines else type(error).__name__
        return RegistryError(
            f"importing module {module_name!r}{where} of {self.kind} {reference!r} failed: {last}"
        )
