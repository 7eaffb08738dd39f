"""hf-moe: HyperMoE, HyperRouter, MH-MoE and dynamic top-p routing as transformers model families.

Importing the package registers every family's config with `AutoConfig` and every head with its `AutoModel...` class.
The package loads lazily, so that `hf-moe --help` answers before torch loads: the names below load on first use, and
the registration runs as soon as transformers is imported (at once if it already is), before any Auto class can be
reached.
"""

import importlib
import importlib.abc
import importlib.util
import os
import sys

__version__ = "0.2.0"


def _read_registry() -> dict:
    """`REGISTRY` of hf_moe/modeling/registry.py (model type -> class prefix, module), read without importing
    hf_moe.modeling, which loads torch: the command line lists the families before loading them."""
    spec = importlib.util.spec_from_file_location(
        f"{__name__}._registry_table", os.path.join(os.path.dirname(__file__), "modeling", "registry.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.REGISTRY


_REGISTRY = _read_registry()
FAMILY_NAMES = tuple(_REGISTRY)  # the model types of the families, in registry order
_CLASS_PREFIXES = [prefix for prefix, _ in _REGISTRY.values()]
_HEADS = ("Model", "ForCausalLM", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification",
          "ForQuestionAnswering", "ForMultipleChoice", "ForConditionalGeneration")  # `hf_moe.modeling.HEADS`
_MODEL_CLASSES = [prefix + head for prefix in _CLASS_PREFIXES for head in _HEADS]
_FROM_MODELING = [
    "ADAPTERS", "HEADS", "MODEL_CLASSES", "DynamicMoeConfig", "DynamicMoeLayer", "FfnSpec", "HyperExpertGenerator",
    "HyperMoeConfig", "HyperMoeLayer", "HyperRouterConfig", "HyperRouterLayer", "MoeConfig", "MoeLayerOutput",
    "MoeFamily", "MoePreTrainedModel", "MultiHeadMoeConfig", "MultiHeadMoeLayer", "TopKMoeConfig", "TopKMoeLayer",
    "all_families", "get_family", "mh_moe_matched_sizes",
]
_FROM_CONVERSION = ["UpcycleOptions", "convert_moe", "upcycle", "upcycle_model"]

__all__ = ["FAMILY_NAMES", *_FROM_MODELING, *_MODEL_CLASSES, *_FROM_CONVERSION]


def __getattr__(name):
    if name in _FROM_CONVERSION:
        value = getattr(importlib.import_module(".conversion", __name__), name)
    elif name in __all__:
        modeling = importlib.import_module(".modeling", __name__)
        if name in _MODEL_CLASSES:
            value = {cls.__name__: cls for cls in modeling.MODEL_CLASSES.values()}[name]
        else:
            value = getattr(modeling, name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


def _register_families():
    from transformers import AutoConfig

    from .modeling import HEADS, MODEL_CLASSES, all_families

    for model_type, family in all_families().items():
        AutoConfig.register(model_type, family.config_class, exist_ok=True)
    for (_, head), model_class in MODEL_CLASSES.items():
        HEADS[head].register(model_class.config_class, model_class, exist_ok=True)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls `then()` right after the module `name` is first executed (a one-shot import hook)."""

    def __init__(self, name, then):
        self.name, self.then = name, then

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)  # the spec the other finders give, with a loader made for it
        if spec is None:
            return None
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            self.then()

        spec.loader.exec_module = exec_module
        return spec


if "transformers" in sys.modules:
    _register_families()
else:
    # hf_moe.modeling registers once it has loaded, and importing transformers loads it. When transformers is first
    # imported from inside hf_moe.modeling, the import below finds it already loading and the registration follows.
    sys.meta_path[:0] = [
        _AfterImport(f"{__name__}.modeling", _register_families),
        _AfterImport("transformers", lambda: importlib.import_module(f"{__name__}.modeling")),
    ]
