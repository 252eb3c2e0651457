"""transformers' own common model tests (tests/test_modeling_common.py of the transformers sdist) on
tiny configs of the MoE families, plain and with smoe patched in. Not collected by pytest (manual):

  pip download --no-binary :all: --no-deps transformers==$(python3 -c "import transformers as t; print(t.__version__)") -d build/sdist
  tar xzf build/sdist/transformers-*.tar.gz -C build/sdist
  HF_COMMON=build/sdist/transformers-<version> FAMILY=mixtral SMOE=1 PYTHONPATH=python \
      python3 -m pytest tests/python/hf_common.py -q -p no:cacheprovider

SMOE=experts (transformers 5.x) sets config._experts_implementation = "smoe" after register().
SMOE=1 makes every model class a subclass whose __init__ ends with replace_moe_blocks (so
model_class(config) and model_class.from_pretrained(...) are patched models); SMOE=0 runs the plain
classes. The sdist has no tests/generation/ (GenerationTesterMixin) and no tests/models/ (the
per-family testers): a stub mixin stands in for the first (generation is tested in
test_hf_families.py) and _Tester below for the second.
"""

import os
import sys
import types
import unittest

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
ROOT = os.path.abspath(os.environ.get("HF_COMMON", ""))
sys.path.insert(0, ROOT)
# tests.generation.test_utils is not in the sdist: a stub GenerationTesterMixin
gen = types.ModuleType("tests.generation.test_utils")
gen.GenerationTesterMixin = type("GenerationTesterMixin", (), {})
sys.modules["tests.generation"] = types.ModuleType("tests.generation")
sys.modules["tests.generation.test_utils"] = gen
# transformers 5.x also imports tests.exporters.test_export (not in the sdist either)
exp = types.ModuleType("tests.exporters.test_export")
exp.ExportTesterMixin = type("ExportTesterMixin", (), {})
sys.modules["tests.exporters"] = types.ModuleType("tests.exporters")
sys.modules["tests.exporters.test_export"] = exp

import hf_tiny  # noqa: E402
from smoe.integrations import hf  # noqa: E402
from tests.test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

FAMILY = os.environ.get("FAMILY", "mixtral")
MODE = os.environ.get("SMOE", "1")  # "0": plain, "1": patched, "experts": the 5.x experts backend
SMOE = MODE == "1"
if MODE == "experts":
    hf.register(backend="cpu")


def _config():
    cfg = hf_tiny.tiny_config(FAMILY)
    if MODE == "experts":
        cfg._experts_implementation = "smoe"
    return cfg


class _Tester:
    def __init__(self, parent):
        self.parent = parent
        self.batch_size, self.seq_length, self.is_training = 2, 7, True
        cfg = hf_tiny.tiny_config(FAMILY)
        self.config = cfg
        self.vocab_size, self.hidden_size = cfg.vocab_size, cfg.hidden_size
        self.num_hidden_layers, self.num_attention_heads = cfg.num_hidden_layers, cfg.num_attention_heads

    def prepare_config_and_inputs_for_common(self):
        ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        mask = random_attention_mask([self.batch_size, self.seq_length])
        return _config(), {"input_ids": ids, "attention_mask": mask}


def _patched_class(cls):
    """cls whose instances are patched. Same __name__ (the mixin picks inputs, e.g. labels, by class
    name). from_pretrained loads the plain class, then patches (smoe.integrations.hf.from_pretrained):
    transformers assigns checkpoint tensors by parameter name, which a patched model does not have."""

    def __init__(self, config, *args, **kwargs):
        cls.__init__(self, config, *args, **kwargs)
        hf.replace_moe_blocks(self)

    def from_pretrained(klass, *args, **kwargs):
        out = cls.from_pretrained(*args, **kwargs)  # (model, loading_info) with output_loading_info=True
        hf.replace_moe_blocks(out[0] if isinstance(out, tuple) else out)
        return out

    return type(
        cls.__name__,
        (cls,),
        {"__init__": __init__, "from_pretrained": classmethod(from_pretrained), "__module__": cls.__module__},
    )


_cls = AutoModelForCausalLM._model_mapping[type(hf_tiny.tiny_config(FAMILY))]


class CommonTests(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (_patched_class(_cls) if SMOE else _cls,)
    all_generative_model_classes = ()  # generation: test_hf_families.py (the sdist lacks GenerationTesterMixin)
    test_pruning = False
    test_head_masking = False

    def setUp(self):
        torch.manual_seed(0)
        self.model_tester = _Tester(self)
