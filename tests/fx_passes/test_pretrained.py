"""``fx_passes.load_pretrained_sharded``: a ``save_pretrained`` checkpoint loaded expert-parallel.

Tiny random Qwen3-MoE and Mixtral causal LMs (2 layers, 8 experts, hidden 32) saved to a
temporary directory: with one tensor per expert (what ``save_pretrained`` writes), with stacked
experts, in one file and sharded (``model.safetensors.index.json``). At W = 2 on gloo each rank
holds the rows of ``from_pretrained``'s model for its experts, reads no other rank's expert
(every ``safe_open(...).get_slice(key)[index]`` is recorded), and the compiled model gives
``from_pretrained``'s logits; at W = 1 the whole model equals ``from_pretrained``'s. Errors are
raised on every rank before anything is read.
"""

from __future__ import annotations

import contextlib
import re

import pytest
import torch
import torch.distributed as dist

import fx_passes
from tests import _dist

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")
# transformers.modeling_utils binds safetensors.safe_open when it is first imported: import it
# before a test wraps safe_open
pytest.importorskip("transformers.modeling_utils")
from torch.distributed.tensor import DTensor  # noqa: E402

E = 8
_SMALL = dict(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, num_experts_per_tok=2,
)  # fmt: skip


def _config(kind: str):
    if kind == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **_SMALL, num_experts=E, moe_intermediate_size=16, intermediate_size=48
        )
    return transformers.MixtralConfig(
        **_SMALL, num_local_experts=E, intermediate_size=16, tie_word_embeddings=True
    )


def _save(path, kind: str, layout: str = "per_expert", max_shard_size=None) -> str:
    """A random model saved to ``path``: by ``save_pretrained`` (one tensor per expert), or with
    the model's own stacked ``[E, ...]`` expert tensors (``layout="stacked"``)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(kind))
    if layout == "per_expert":
        kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(path, **kw)
    else:
        from safetensors.torch import save_file

        model.config.save_pretrained(path)
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(state, f"{path}/model.safetensors", metadata={"format": "pt"})
    return str(path)


class _Slice:
    def __init__(self, real, key, log):
        self._real, self._key, self._log = real, key, log

    def get_shape(self):
        return self._real.get_shape()

    def get_dtype(self):
        return self._real.get_dtype()

    def __getitem__(self, index):
        self._log.append((self._key, index))
        return self._real[index]


class _File:
    def __init__(self, real, log):
        self._real, self._log = real, log

    def __enter__(self):
        self._real.__enter__()
        return self

    def __exit__(self, *exc):
        return self._real.__exit__(*exc)

    def keys(self):
        return self._real.keys()

    def get_slice(self, key):
        return _Slice(self._real.get_slice(key), key, self._log)

    def get_tensor(self, key):  # not used by the loader: a whole-tensor read
        self._log.append((key, ...))
        return self._real.get_tensor(key)


@contextlib.contextmanager
def _recording_reads():
    """Every ``safetensors.safe_open(...)`` read in here is logged as ``(key, index)``."""
    log, real = [], safetensors.safe_open
    safetensors.safe_open = lambda *a, **kw: _File(real(*a, **kw), log)
    try:
        yield log
    finally:
        safetensors.safe_open = real


@contextlib.contextmanager
def _fake_group(rank: int, world_size: int):
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _check_reads(log, local: range) -> int:
    """Only local experts were read: one expert's tensor (``experts.<e>.``) only for a local e, a
    stacked tensor only as its local rows; every other tensor whole. Returns the expert reads."""
    expert_reads = 0
    for key, index in log:
        if (m := re.search(r"(^|\.)experts\.(\d+)\.", key)) is not None:
            assert int(m.group(2)) in local and index is Ellipsis, (key, index)
            expert_reads += 1
        elif re.search(r"(^|\.)experts\.", key):
            assert index == slice(local.start, local.stop), (key, index)
            expert_reads += 1
        else:
            assert index is Ellipsis, (key, index)
    assert len({k for k, _ in log}) == len(log)  # each tensor read once
    return expert_reads


# ----------------------------------------------------------------------------- cases (run on ranks)
def _load_on_rank(path: str, compile_: bool) -> dict:
    rank, W = dist.get_rank(), dist.get_world_size()
    device = _dist.device()
    local = range(rank * E // W, (rank + 1) * E // W)
    with _recording_reads() as log:
        model = fx_passes.load_pretrained_sharded(path, device=device)
    expert_reads = _check_reads(log, local)
    assert model.config._experts_implementation == "grouped_mm"
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        path, experts_implementation="grouped_mm"
    ).to(device)
    want = ref.state_dict()
    got = model.state_dict()
    assert list(got) == list(want)
    expert_bytes = 0
    for key, value in got.items():
        if isinstance(value, DTensor):
            assert value.device_mesh.device_type == device.type
            torch.testing.assert_close(
                value.to_local(), want[key][local.start : local.stop], rtol=0, atol=0
            )
            expert_bytes += value.to_local().nbytes
        else:
            torch.testing.assert_close(value, want[key], rtol=0, atol=0)
    for (name, b), (_, b_ref) in zip(model.named_buffers(), ref.named_buffers(), strict=True):
        torch.testing.assert_close(b, b_ref, msg=name)  # rotary inv_freq recomputed
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.get_input_embeddings().weight
    if compile_:
        x = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(rank))
        x = x.to(device)
        torch._dynamo.reset()
        backend = fx_passes.moe_backend(inner="aot_eager")
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        with torch.no_grad():
            out = compiled(x, use_cache=False).logits
            torch.testing.assert_close(out, ref(x, use_cache=False).logits)
        assert len(backend.matches) == _SMALL["num_hidden_layers"]
    return dict(expert_reads=expert_reads, expert_bytes=expert_bytes)


# ----------------------------------------------------------------------------- tests
def test_qwen3_moe_at_2_reads_only_local_experts_and_matches(gloo_world, tmp_path):
    path = _save(tmp_path / "qwen3", "qwen3_moe")
    results = gloo_world(2).run(_load_on_rank, path, True)
    # per layer and local expert: gate_proj, up_proj, down_proj
    assert [r["expert_reads"] for r in results] == [2 * 4 * 3] * 2


def test_mixtral_sharded_checkpoint_tied_embeddings_at_2(gloo_world, tmp_path):
    """``block_sparse_moe.experts.<e>.w1/w2/w3`` renamed and merged, over several files; not
    compiled (the Qwen3-MoE case runs the loaded model; this one would only add compile time)."""
    path = _save(tmp_path / "mixtral", "mixtral", max_shard_size="20KB")
    assert len(list((tmp_path / "mixtral").glob("model-*.safetensors"))) > 1
    results = gloo_world(2).run(_load_on_rank, path, False)
    assert [r["expert_reads"] for r in results] == [2 * 4 * 3] * 2


def test_stacked_checkpoint_at_2_reads_local_rows(gloo_world, tmp_path):
    path = _save(tmp_path / "stacked", "qwen3_moe", layout="stacked")
    results = gloo_world(2).run(_load_on_rank, path, False)
    assert [r["expert_reads"] for r in results] == [2 * 2] * 2  # gate_up_proj, down_proj
    full = sum(
        p.nbytes
        for n, p in transformers.AutoModelForCausalLM.from_pretrained(path).named_parameters()
        if ".experts." in n
    )
    assert all(r["expert_bytes"] == full // 2 for r in results)


def test_one_rank_without_process_group_equals_from_pretrained(tmp_path):
    path = _save(tmp_path / "qwen3", "qwen3_moe")
    model = fx_passes.load_pretrained_sharded(path, device="cpu")
    ref = transformers.AutoModelForCausalLM.from_pretrained(path)
    want = ref.state_dict()
    assert list(model.state_dict()) == list(want)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, want[key], rtol=0, atol=0)
    assert not model.training
    x = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits)


def test_mismatches_raise_on_every_rank_before_reading(tmp_path):
    per_expert = _save(tmp_path / "per_expert", "qwen3_moe")
    stacked = _save(tmp_path / "stacked", "qwen3_moe", layout="stacked")
    incomplete = _save(tmp_path / "incomplete", "qwen3_moe", layout="stacked")
    from safetensors.torch import load_file, save_file

    state = load_file(f"{incomplete}/model.safetensors")
    del state["model.layers.1.post_attention_layernorm.weight"]
    save_file(state, f"{incomplete}/model.safetensors", metadata={"format": "pt"})
    cases = [
        (2, per_expert, {"num_experts": 4}, "holds 8 experts' .* the model 4"),
        (2, stacked, {"num_experts": 4}, "it holds 8 experts, not 4"),
        (2, incomplete, {}, "provides no tensor for 1 .*layers.1.post_attention_layernorm"),
        (3, per_expert, {}, "8 experts, not a multiple of the group size 3"),
    ]
    for world_size, path, config_kwargs, match in cases:
        for rank in range(world_size):
            with (
                _fake_group(rank, world_size),
                _recording_reads() as log,
                pytest.raises(ValueError, match=match),
            ):
                fx_passes.load_pretrained_sharded(path, device="cpu", **config_kwargs)
            assert log == []


class _ListConfig(transformers.PretrainedConfig):
    model_type = "moe_ops_test_list_experts"

    def __init__(self, hidden=8, num_experts=4, **kwargs):
        self.hidden, self.num_experts = hidden, num_experts
        super().__init__(**kwargs)


class _ListModel(transformers.PreTrainedModel):
    """ModuleList experts, and a non-persistent buffer its ``_init_weights`` sets."""

    config_class = _ListConfig

    def __init__(self, config):
        super().__init__(config)
        h = config.hidden
        self.proj = torch.nn.Linear(h, h)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(h, h) for _ in range(config.num_experts))
        self.register_buffer("scale", torch.full((h,), 2.0), persistent=False)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if module is self:
            transformers.initialization.copy_(self.scale, torch.full_like(self.scale, 2.0))


def test_module_list_experts_of_other_ranks_are_not_read(tmp_path):
    torch.manual_seed(0)
    saved = _ListModel(_ListConfig())
    saved.save_pretrained(tmp_path)
    for rank in range(2):
        with _fake_group(rank, 2), _recording_reads() as log:
            model = fx_passes.load_pretrained_sharded(tmp_path, device="cpu", model_cls=_ListModel)
        assert _check_reads(log, range(2 * rank, 2 * rank + 2)) == 4  # 2 experts: weight, bias
        keys = sorted(k for k in model.state_dict() if k.startswith("experts."))
        assert keys == [
            f"experts.{e}.{n}" for e in (2 * rank, 2 * rank + 1) for n in ("bias", "weight")
        ]
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, saved.state_dict()[key], rtol=0, atol=0)
        torch.testing.assert_close(model.scale, torch.full((8,), 2.0))
