"""Name -> component registries for the two things YAML names: rewards and filters.

A YAML entry names a registered built-in (`answer_match`) or, for the user's own code, an
explicit `module:attribute` reference (`my_project.rewards:brevity`). Only such explicit
references are ever imported; no other config string is evaluated or imported.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from collections.abc import Callable
from typing import Generic, TypeVar

from align.config import ConfigError

T = TypeVar("T")


class RegistryError(ConfigError):
    """A duplicate registration, an unknown name or a plug-in reference that cannot be loaded."""


class Registry(Generic[T]):
    """Components of one kind ("reward", "filter") by name."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._items)

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering a component under `name`.

        Raises:
            RegistryError: `name` is already taken; the message lists the known names.
        """

        def add(item: T) -> T:
            if name in self._items:
                raise RegistryError(
                    f"{self.kind} name {name!r} is already registered; "
                    f"known {self.kind}s: {', '.join(self.names())}"
                )
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        """The component registered as `name`, or the one a `module:attribute` reference names.

        Raises:
            RegistryError: unknown name (with the known names and the closest match), or a
                plug-in reference whose module or attribute cannot be found.
        """
        if ":" in name:
            return self._load_plugin(name)
        if name not in self._items:
            close = difflib.get_close_matches(name, self.names(), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RegistryError(
                f"unknown {self.kind} {name!r}.{hint} Known {self.kind}s: "
                f"{', '.join(self.names())}; or name your own as 'module:function'."
            )
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
