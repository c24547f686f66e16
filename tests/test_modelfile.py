"""Loading model.py: what it must define, and how each mistake is reported (ModelFileError naming
the file and the function, with the user's own exception text)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from sparsec.errors import ModelFileError
from sparsec.modelfile import load

GOOD = """
import torch

def build_model():
    return torch.nn.Linear(4, 2)

def example_inputs():
    return torch.zeros(3, 4)
"""


def write(tmp_path: Path, source: str, name: str = "model.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def test_loads_model_inputs_and_optional_functions(tmp_path):
    path = write(tmp_path, GOOD + "\ndef train_data():\n    return []\n")
    mf = load(path)
    assert isinstance(mf.model, torch.nn.Linear)
    assert isinstance(mf.example_inputs, tuple) and mf.example_inputs[0].shape == (3, 4)
    assert mf.example_kwargs == {}
    assert mf.has("train_data") and not mf.has("eval_data") and not mf.has("loss")
    assert mf.call("train_data") == []


def test_example_kwargs(tmp_path):
    path = write(tmp_path, GOOD + "\ndef example_kwargs():\n    return {'scale': 2.0}\n")
    assert load(path).example_kwargs == {"scale": 2.0}


def test_model_folder_is_importable_while_loading(tmp_path):
    (tmp_path / "helper_layers.py").write_text("import torch\nWIDTH = 5\n")
    path = write(tmp_path, GOOD.replace("Linear(4, 2)", "Linear(4, helper_layers.WIDTH)")
                 .replace("import torch", "import torch\nimport helper_layers"))
    assert load(path).model.out_features == 5


@pytest.mark.parametrize("source, fragments", [
    ("def example_inputs():\n    return 1\n", ["build_model()"]),
    ("import torch\ndef build_model():\n    return torch.nn.Linear(1, 1)\n", ["example_inputs()"]),
    ("x = \n", ["syntax error", ":1"]),
    ("raise KeyError('HF_TOKEN')\n", ["importing it raised KeyError", "HF_TOKEN"]),
    (GOOD.replace("return torch.nn.Linear(4, 2)", "return [1, 2]"), ["torch.nn.Module", "list"]),
    (GOOD.replace("return torch.nn.Linear(4, 2)", "raise OSError('no weights here')"),
     ["build_model() raised OSError", "no weights here"]),
    (GOOD.replace("return torch.zeros(3, 4)", "return 'abc'"), ["example_inputs()", "str"]),
    (GOOD + "\ndef example_kwargs():\n    return [1]\n", ["example_kwargs() must return a dict", "list"]),
])
def test_mistakes_are_model_file_errors_naming_the_file(tmp_path, source, fragments):
    path = write(tmp_path, source)
    with pytest.raises(ModelFileError) as info:
        load(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_missing_file_and_wrong_kind_of_path(tmp_path):
    with pytest.raises(ModelFileError, match="no such file"):
        load(tmp_path / "absent.py")
    with pytest.raises(ModelFileError, match="expected a Python file"):
        load(tmp_path)
    text = tmp_path / "model.txt"
    text.write_text("x = 1")
    with pytest.raises(ModelFileError, match="expected a Python file"):
        load(text)


def test_call_wraps_the_users_exception(tmp_path):
    path = write(tmp_path, GOOD + "\ndef eval_data():\n    raise FileNotFoundError('test.csv')\n")
    mf = load(path)
    with pytest.raises(ModelFileError, match=r"eval_data\(\) raised FileNotFoundError: test.csv"):
        mf.call("eval_data")
    with pytest.raises(ModelFileError, match=r"train_data\(\) is not defined"):
        mf.call("train_data")


def test_each_load_is_a_fresh_module(tmp_path):
    path = write(tmp_path, GOOD + "\nCOUNTER = []\ndef bump():\n    COUNTER.append(1)\n    return len(COUNTER)\n")
    first, second = load(path), load(path)
    assert first.call("bump") == 1 and second.call("bump") == 1
