"""hf-moe: HyperMoE, HyperRouter, MH-MoE and dynamic top-p routing as transformers model families.

Importing the package registers every family's config with `AutoConfig` and every head with its `AutoModel...` class.
The package loads lazily, so that `hf-moe --help` answers before torch loads: the names below load on first use, and
the registration runs as soon as transformers is imported (at once if it already is), before any Auto class can be
reached.
"""

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

# model type -> class-name prefix. Light for the CLI; a test ties it to `hf_moe.modeling.FAMILY_BY_MODEL_TYPE`.
FAMILY_NAMES = {
    "topk_moe": "TopKMoe",
    "hypermoe": "HyperMoe",
    "hyperrouter": "HyperRouter",
    "mh_moe": "MultiHeadMoe",
    "dynamic_moe": "DynamicMoe",
}
_HEADS = ("Model", "ForCausalLM", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification",
          "ForQuestionAnswering", "ForMultipleChoice", "ForConditionalGeneration")  # `hf_moe.modeling.HEADS`
_MODEL_CLASSES = [prefix + head for prefix in FAMILY_NAMES.values() for head in _HEADS]
_FROM_MODELING = [
    "ADAPTERS", "HEADS", "MODEL_CLASSES", "DynamicMoeConfig", "DynamicMoeLayer", "FfnSpec", "HyperExpertGenerator",
    "HyperMoeConfig", "HyperMoeLayer", "HyperRouterConfig", "HyperRouterLayer", "MoeConfig", "MoeLayerOutput",
    "MoePreTrainedModel", "MultiHeadMoeConfig", "MultiHeadMoeLayer", "TopKMoeConfig", "TopKMoeLayer",
    "mh_moe_matched_sizes",
]
_FROM_CONVERSION = ["UpcycleOptions", "convert_moe", "upcycle", "upcycle_model"]

__all__ = ["FAMILY_CONFIGS", "FAMILY_NAMES", *_FROM_MODELING, *_MODEL_CLASSES, *_FROM_CONVERSION]


def __getattr__(name):
    if name in _FROM_CONVERSION:
        value = getattr(importlib.import_module(".conversion", __name__), name)
    elif name in __all__:
        modeling = importlib.import_module(".modeling", __name__)
        if name == "FAMILY_CONFIGS":
            value = tuple(modeling.FAMILY_CONFIG_CLASSES.values())
        elif name in _MODEL_CLASSES:
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

    from .modeling import FAMILY_CONFIG_CLASSES, HEADS, MODEL_CLASSES

    for model_type, config_class in FAMILY_CONFIG_CLASSES.items():
        AutoConfig.register(model_type, config_class, exist_ok=True)
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
