"""`import hywia` makes transformers load per-layer exports, without importing transformers itself.

Registering `HywiaLlamaConfig` / `HywiaLlamaForCausalLM` with the Auto classes (hywia.arch) needs
transformers' auto modules, which take seconds to import; `import hywia` must stay instant (the CLI's
`--help`, the server's start). So the registration waits for those modules: a finder on
`sys.meta_path` notices when transformers imports `configuration_auto` (then the config is
registered) and `modeling_auto` (then the model class), and registers right after each has loaded.
Modules already imported when hywia is imported are registered at once.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys

log = logging.getLogger(__name__)

_CONFIG_MODULE = "transformers.models.auto.configuration_auto"
_MODEL_MODULE = "transformers.models.auto.modeling_auto"


def _register_config() -> None:
    from hywia.arch.configuration_hywia_llama import register_config

    register_config()


def _register_model() -> None:
    from hywia.arch import register

    register()


_AFTER_IMPORT = {_CONFIG_MODULE: _register_config, _MODEL_MODULE: _register_model}


def _run(name: str) -> None:
    try:
        _AFTER_IMPORT[name]()
    except ImportError:
        # transformers can load configuration_auto while one of its own modules is half-imported (e.g.
        # peft imports transformers in that order): registering then is a circular import. The model
        # hook, which fires once modeling_auto has loaded, registers the config as well.
        log.debug("per-layer registration deferred: %s is mid-import", name, exc_info=True)
    except Exception:  # a failed registration must not break the user's own transformers import
        log.warning("could not register the per-layer architecture with transformers", exc_info=True)


class _RegisteringLoader(importlib.abc.Loader):
    """Delegates to the module's own loader, then registers."""

    def __init__(self, loader, name: str):
        self._loader, self._name = loader, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _run(self._name)


class _AfterTransformersImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _AFTER_IMPORT:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _RegisteringLoader(spec.loader, fullname)
                return spec
        return None


def register_when_transformers_loads() -> None:
    """Idempotent: one finder, however often hywia is reloaded."""
    if not any(isinstance(finder, _AfterTransformersImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformersImport())
    for name in _AFTER_IMPORT:
        if name in sys.modules:
            _run(name)
