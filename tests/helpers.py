"""Small models and specs shared by the tests.

Every model here is tiny (hidden size ~32, one or two layers) so that the default test run stays
fast. Zoo entries return `(model, example_args, example_kwargs)`; `zoo_inputs(name, batch, seq)`
builds fresh inputs of another batch / sequence length for the same model.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

VOCAB = 50
HIDDEN = 32


# ------------------------------------------------------------------------------------ plain models
class MLP(nn.Module):
    """Linear -> ReLU -> Dropout -> Linear -> ReLU -> Linear."""

    def __init__(self, d_in: int = 8, hidden: int = 16, d_out: int = 4, p: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.drop = nn.Dropout(p)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(torch.relu(self.fc1(x)))
        return self.fc3(torch.relu(self.fc2(x)))


class CNN(nn.Module):
    """Conv -> BatchNorm -> ReLU -> Conv -> global pool -> Linear."""

    def __init__(self, channels: int = 4, classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1, bias=False)
        self.fc = nn.Linear(2 * channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv1(x)))
        x = self.conv2(x).mean(dim=(2, 3))
        return self.fc(x)


def mlp(seed: int = 0, **kwargs: Any) -> MLP:
    torch.manual_seed(seed)
    return MLP(**kwargs)


def cnn(seed: int = 0, **kwargs: Any) -> CNN:
    torch.manual_seed(seed)
    return CNN(**kwargs)


def mlp_input(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 8, generator=torch.Generator().manual_seed(seed))


def cnn_input(batch: int = 2, size: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ transformers zoo
def _tokens(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _text_kwargs(batch: int, seq: int) -> dict[str, torch.Tensor]:
    return {"input_ids": _tokens(batch, seq), "attention_mask": torch.ones(batch, seq, dtype=torch.int64)}


def _bert(dropout: float) -> nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout))


def _distilbert(dropout: float) -> nn.Module:
    from transformers import DistilBertConfig, DistilBertModel

    return DistilBertModel(DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=1, n_heads=2,
                                            hidden_dim=64, max_position_embeddings=64,
                                            dropout=dropout, attention_dropout=dropout))


def _gpt2(dropout: float) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=1, n_head=2,
                                      n_positions=64, resid_pdrop=dropout, embd_pdrop=dropout,
                                      attn_pdrop=dropout, use_cache=False, bos_token_id=0,
                                      eos_token_id=0))


def _t5(dropout: float) -> nn.Module:
    from transformers import T5Config, T5Model

    return T5Model(T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=16, d_ff=64, num_layers=1,
                            num_decoder_layers=1, num_heads=2, dropout_rate=dropout, use_cache=False,
                            decoder_start_token_id=0))


def _llama(dropout: float) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=2, max_position_embeddings=64,
                                        attention_dropout=dropout, use_cache=False))


def _vit(dropout: float) -> nn.Module:
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=HIDDEN,
                              num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                              hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout))


def _resnet(dropout: float) -> nn.Module:
    from transformers import ResNetConfig, ResNetModel

    return ResNetModel(ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16],
                                    depths=[1, 1], layer_type="basic"))


def _text_inputs(batch: int, seq: int) -> tuple[tuple, dict]:
    return (), _text_kwargs(batch, seq)


def _t5_inputs(batch: int, seq: int) -> tuple[tuple, dict]:
    kwargs = _text_kwargs(batch, seq)
    kwargs["decoder_input_ids"] = _tokens(batch, max(2, seq // 2), seed=2)
    return (), kwargs


def _image_inputs(batch: int, seq: int) -> tuple[tuple, dict]:
    # `seq` is ignored: the image size is fixed by the config's position embeddings.
    pixels = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    return (), {"pixel_values": pixels}


# name -> (builder(dropout), inputs(batch, seq))
ZOO: dict[str, tuple[Callable[[float], nn.Module], Callable[[int, int], tuple[tuple, dict]]]] = {
    "bert": (_bert, _text_inputs),
    "distilbert": (_distilbert, _text_inputs),
    "gpt2": (_gpt2, _text_inputs),
    "t5": (_t5, _t5_inputs),
    "llama": (_llama, _text_inputs),
    "vit": (_vit, _image_inputs),
    "resnet": (_resnet, _image_inputs),
}


def zoo_model(name: str, dropout: float = 0.0, seed: int = 0) -> nn.Module:
    """A tiny transformers model by zoo name, in eval mode, deterministic for `seed`."""
    torch.manual_seed(seed)
    model = ZOO[name][0](dropout)
    model.eval()
    return model


def zoo_inputs(name: str, batch: int = 2, seq: int = 8) -> tuple[tuple, dict]:
    return ZOO[name][1](batch, seq)


def first_tensor(output: Any) -> torch.Tensor:
    """The main tensor of a model output (transformers ModelOutput, tuple or tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        return next(v for v in output.values() if isinstance(v, torch.Tensor))
    if isinstance(output, (tuple, list)):
        return first_tensor(output[0])
    raise TypeError(f"no tensor in {type(output).__name__}")


def all_tensors(output: Any) -> list[torch.Tensor]:
    """Every tensor of a model output, in a deterministic order."""
    from torch.utils import _pytree as pytree

    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    return [x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor)]


# ------------------------------------------------------------------------------------------ specs
def spec_dict(targets: list[str] | None = None, method: str = "movement", density: float = 0.5,
              scope: str = "global", block: tuple[int, int] = (1, 1), schedule: dict | None = None,
              exclude: list[str] | None = None, capture: dict | None = None,
              **options: Any) -> dict[str, Any]:
    """A one-group spec dict; `schedule` defaults to constant, so masks are final from step 0."""
    group: dict[str, Any] = {"targets": targets or ["*"], "method": method, "density": density,
                             "scope": scope, "block": list(block), **options}
    if exclude:
        group["exclude"] = exclude
    spec: dict[str, Any] = {"prune": [group], "schedule": schedule or {"kind": "constant"}}
    if capture:
        spec["capture"] = capture
    return spec


def make_spec(spec: dict[str, Any]):
    """A loaded Spec object from a dict (sparsec.spec.load_spec)."""
    from sparsec.spec import load_spec

    return load_spec(spec)


def compile_mlp(spec: dict[str, Any] | None = None, seed: int = 0, **kwargs: Any):
    """(model, program) for the plain MLP compiled with `spec` (default: movement, 0.5, constant)."""
    import sparsec

    model = mlp(seed, **kwargs)
    program = sparsec.compile(model, spec or spec_dict(["fc*"]), (mlp_input(),))
    return model, program


def rewrite(model: nn.Module, args: tuple, spec: dict[str, Any] | None = None,
            kwargs: dict | None = None, until: str | None = None):
    """capture + the spec's pipeline up to and including the pass named `until` (all by default)."""
    from sparsec.capture import capture
    from sparsec.passes import build_pipeline
    from sparsec.pipeline import run_pipeline

    loaded = make_spec(spec or spec_dict())
    passes = build_pipeline(loaded)
    if until is not None:
        passes = passes[:[p.name for p in passes].index(until) + 1]
    gm = capture(model, args, kwargs or {}, method=loaded.capture.method, dynamic=loaded.capture.dynamic)
    return run_pipeline(gm, passes)


class MatmulTied(nn.Module):
    """Sites of every kind but conv: `x @ W` with a parameter W, a linear, plus an embedding whose
    weight is tied to the output projection (F.linear with the embedding's weight)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.proj = nn.Parameter(torch.randn(8, 16) * 0.1)
        self.fc = nn.Linear(16, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) @ self.proj
        h = self.fc(torch.relu(h))
        return torch.nn.functional.linear(h, self.embed.weight)


def matmul_tied(seed: int = 0) -> MatmulTied:
    torch.manual_seed(seed)
    return MatmulTied()


def ids_input(batch: int = 2, seq: int = 5) -> torch.Tensor:
    return _tokens(batch, seq)


def roles_of(gm) -> dict[str, str]:
    """node name -> sparsec role, for the IR's role tags."""
    from sparsec.ir import node_info

    return {n.name: info.role for n in gm.graph.nodes if (info := node_info(n)) is not None}


def run_onnx_pass(onnx_pass, model, facts=("exported",)):
    """Run one ONNX pass through the pipeline runner on a ModelProto (as an onnx_ir model with
    `facts` established, verified after the pass); returns (modified, the rewritten ModelProto)."""
    import onnx_ir as ir

    from sparsec.lowering import onnx_graph
    from sparsec.pipeline import run_pipeline

    converted = ir.from_proto(model)
    onnx_graph.facts(converted).update(facts)
    before = ir.to_proto(converted).SerializeToString()
    result = run_pipeline(converted, [onnx_pass])
    after = ir.to_proto(result)
    return after.SerializeToString() != before, after


def apply_rewrite(rewrite, model):
    """Run a rewrite (a function of an onnx_ir model returning a count) on a ModelProto; returns
    (count, the rewritten ModelProto)."""
    import onnx_ir as ir

    converted = ir.from_proto(model)
    count = rewrite(converted)
    return count, ir.to_proto(converted)


def run_ort(model, feeds: dict) -> list:
    """Outputs of stock onnxruntime on a ModelProto."""
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


class Wide(nn.Module):
    """Linear 96 -> 128 -> ReLU -> Linear 70: shapes for lowering tests."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(96, 128)
        self.fc2 = nn.Linear(128, 70)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def lowering_program(density: float, block=(16, 16), model=None, args=None, kwargs=None):
    """A magnitude-pruned Program (local scope) in eval mode, Wide by default."""
    import sparsec

    torch.manual_seed(0)
    model = model or Wide()
    args = args if args is not None else (torch.randn(5, 96),)
    spec = spec_dict(["*"], method="magnitude", density=density, scope="local", block=block)
    return sparsec.compile(model, spec, args, kwargs).eval()
