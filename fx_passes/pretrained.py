"""Load a transformers checkpoint with only this rank's experts in memory:
:func:`load_pretrained_sharded`.

``from_pretrained`` followed by :func:`fx_passes.shard_experts` first materializes every expert on
every rank. Here the model is built on the meta device, sharded there, and only then given memory
(the local ``[E / W, ...]`` rows of the stacked expert parameters, the local experts of a
ModuleList, every non-expert tensor); the safetensors files are then read slice by slice, so a
rank never reads or holds another rank's experts, and peak host and device memory stay near the
non-expert weights plus E / W of the experts.

Checkpoint keys are mapped to the model's through transformers' own conversion mapping
(``transformers.conversion_mapping.get_model_conversion_mapping``): its ``WeightRenaming`` s
(``block_sparse_moe`` -> ``mlp``, ...) and ``WeightConverter`` s (``MergeModulelist``,
``Concatenate``, ``Transpose``, ...) are applied as ``from_pretrained`` applies them, to the
local experts' tensors only, so the model types transformers converts are handled alike: checkpoints
with one tensor per expert (what ``save_pretrained`` writes, e.g.
``mlp.experts.3.gate_proj.weight``), with the experts already stacked (``mlp.experts.gate_up_proj``,
read as the rows ``[r * E / W, (r + 1) * E / W)``), or with ModuleList experts.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import re
import types
import warnings
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn

from fx_passes.group import resolve_group
from fx_passes.sharding import shard_experts

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"

_DTYPES = {  # safetensors dtype names (the dtype of the meta tensors shapes are checked on)
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclasses.dataclass
class _Source:
    """One checkpoint tensor feeding a model tensor, and what of it this rank reads: ``"all"``,
    ``slice(a, b)`` (rows a..b-1 of a stacked ``[E, ...]`` tensor) or None (another rank's expert:
    not read)."""

    key: str
    file: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    read: str | slice | None


@dataclasses.dataclass
class _Group:
    """The checkpoint tensors that make ``target`` (and, for a converter with several targets, its
    siblings), in the order transformers collects them (``dot_natural_key``)."""

    target: str
    converter: object | None  # a transformers WeightConverter template, None for a renaming
    sources: dict[str, list[_Source]] = dataclasses.field(default_factory=dict)


def load_pretrained_sharded(
    path: str | os.PathLike,
    group: dist.ProcessGroup | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    model_cls: type | None = None,
    experts_implementation: str | None = "grouped_mm",
    **config_kwargs,
) -> nn.Module:
    """Load a transformers model saved with ``save_pretrained`` (safetensors), expert-parallel.

    Every rank of ``group`` calls this with the same arguments. The model is built on the meta
    device, :func:`fx_passes.shard_experts` keeps rank r's experts ``[r * E / W, (r + 1) * E / W)``
    (stacked ``[E, ...]`` parameters become DTensor ``Shard(0)`` parameters on a ``DeviceMesh`` of
    ``group`` of ``device``'s type), then only what this rank keeps is allocated on ``device`` and
    read from the safetensors files: another rank's experts are never read. Run the result with
    ``torch.compile(model, backend="moe")`` on the same group.

    Args:
        path: a local checkpoint directory (``save_pretrained`` or ``snapshot_download`` output)
            with ``model.safetensors`` or ``model.safetensors.index.json`` and its shards.
        group: the expert-parallel group; None means the default group when ``torch.distributed``
            is initialized, else a single rank (everything is loaded, as ``from_pretrained``).
        device: where the weights go; default the current accelerator (``cuda:<current>``), else
            the CPU.
        dtype: the model's dtype (a ``torch.dtype`` or its name); default (or ``"auto"``) the
            config's, as ``from_pretrained``'s ``dtype="auto"``.
        model_cls: what builds the model from the config: an Auto class
            (default ``transformers.AutoModelForCausalLM``) or a ``PreTrainedModel`` class (then
            its ``config_class`` reads the config).
        experts_implementation: passed to the model where it takes one (transformers 5 MoE
            models; ``"grouped_mm"``, the default, is what the ``"moe"`` backend rewrites best);
            None leaves transformers' default.
        **config_kwargs: passed to ``AutoConfig.from_pretrained(path, ...)`` (or the config
            class's), e.g. to override a config attribute.

    Returns the model in eval mode, as ``from_pretrained`` does. Raises ``ValueError`` on every
    rank, before any tensor is allocated or read, when the checkpoint does not fit the model: an
    expert count that differs from the model's, a model tensor no checkpoint tensor provides,
    a shape that differs after conversion, an expert count that is not a multiple of the group
    size (from ``shard_experts``), or a quantized checkpoint (not supported).
    """
    import transformers

    tf = _transformers_api()
    path = os.fspath(path)
    device = _resolve_device(device)
    resolve_group(group)  # a TypeError for anything but a ProcessGroup or None, first

    model_cls = model_cls or transformers.AutoModelForCausalLM
    config_cls = getattr(model_cls, "config_class", None) or transformers.AutoConfig
    config = config_cls.from_pretrained(path, **config_kwargs)
    if getattr(config, "quantization_config", None) is not None:
        raise ValueError(
            f"load_pretrained_sharded: {path} is a quantized checkpoint "
            f"({config.quantization_config!r}); only unquantized safetensors checkpoints are "
            f"supported"
        )
    header = _read_header(path)

    # --- the model on the meta device, sharded there
    build = getattr(model_cls, "from_config", None) or model_cls._from_config
    kwargs = {}
    if dtype is not None and dtype != "auto":
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if experts_implementation is not None and _chooses_experts(model_cls, config):
        kwargs["experts_implementation"] = experts_implementation
    with torch.device("meta"):
        model = build(config, **kwargs)
    full_state = model.state_dict(keep_vars=True)
    shards = shard_experts(model, group)
    state = model.state_dict(keep_vars=True)
    dropped = set(full_state) - set(state)  # ModuleList experts of other ranks
    expert_rows = {
        f"{s.path}.{name}": (s.num_experts, s.local_experts)
        for s in shards
        if s.layout == "stacked"
        for name in s.params
    }

    # --- the plan: which checkpoint tensors (and which rows of them) make which model tensors
    mapping = tf.get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, tf.WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, tf.WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    groups: dict[str, _Group] = {}
    unexpected = []
    for key in sorted(header, key=tf.dot_natural_key):
        target, pattern = tf.rename_source_key(
            key, renamings, converters, model.base_model_prefix, full_state
        )
        if target not in full_state and key in full_state:
            target, pattern = tf.rename_source_key(key, [], [], model.base_model_prefix, full_state)
        if target not in full_state:
            unexpected.append(key)
            continue
        if target in dropped:
            continue  # another rank's expert (ModuleList): never read
        file, shape, dt = header[key]
        g = groups.setdefault(target, _Group(target, by_pattern.get(pattern)))
        if pattern is None:
            pattern = key
            if g.sources:
                raise ValueError(
                    f"load_pretrained_sharded: checkpoint tensors {next(iter(g.sources))} and "
                    f"{key} both map to {target}"
                )
        sources = g.sources.setdefault(pattern, [])
        src = _Source(key, file, shape, dt, "all")
        if target in expert_rows:
            src.read = _rows_to_read(src, len(sources), g, full_state[target], expert_rows[target])
        sources.append(src)

    # --- checks, on shapes only (every rank alike): nothing is allocated or read before
    covered = set(dropped)
    for g in groups.values():
        if g.target in expert_rows:
            _check_expert_count(g, expert_rows[g.target][0])
        covered |= _check_shapes(g, model, state, dropped)
    _check_missing(model, state, covered, path)
    _warn_unexpected(model, unexpected, path)

    # --- memory for what this rank keeps, then the reads
    _allocate(model, device)
    state = model.state_dict(keep_vars=True)
    loaded: set[int] = set()
    with contextlib.ExitStack() as stack, torch.no_grad():
        files = {}
        for g in groups.values():
            for name, value in _convert(g, model, files, stack, device).items():
                if name not in dropped:
                    _local(state[name]).copy_(value)
                    loaded.add(id(state[name]))
    _init_buffers(model, loaded)
    model.eval()
    _load_generation_config(model, path)
    return model


# ----------------------------------------------------------------------------- transformers
def _transformers_api() -> types.SimpleNamespace:
    """The loading helpers of transformers >= 5 this module uses."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )
    except ImportError as e:  # pragma: no cover - transformers 4.x
        raise ImportError(
            "load_pretrained_sharded needs transformers >= 5 (its checkpoint conversion mapping)"
        ) from e
    return types.SimpleNamespace(
        get_model_conversion_mapping=get_model_conversion_mapping,
        WeightConverter=WeightConverter,
        WeightRenaming=WeightRenaming,
        dot_natural_key=dot_natural_key,
        rename_source_key=rename_source_key,
    )


def _chooses_experts(model_cls: type, config) -> bool:
    """Whether the model ``model_cls`` builds for ``config`` takes ``experts_implementation``
    (transformers 5 MoE models do; passing it to another model is an error)."""
    cls = model_cls
    with contextlib.suppress(AttributeError, KeyError, TypeError, ValueError):
        cls = model_cls._model_mapping[type(config)]  # an Auto class: the class it picks
    can = getattr(cls, "_can_set_experts_implementation", None)
    return True if can is None else bool(can())


def _resolve_device(device) -> torch.device:
    if device is not None:
        return torch.device(device)
    acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if acc is None:
        return torch.device("cpu")
    return torch.device(acc.type, torch.accelerator.current_device_index())


# ----------------------------------------------------------------------------- checkpoint files
def _safe_open(file: str, device: torch.device):
    """``safetensors.safe_open`` (looked up at each call, so tests can wrap it)."""
    import safetensors

    where = str(device) if device.type in ("cpu", "cuda") else "cpu"
    return safetensors.safe_open(file, framework="pt", device=where)


def _read_header(path: str) -> dict[str, tuple[str, tuple[int, ...], torch.dtype]]:
    """``{key: (file, shape, dtype)}`` of every tensor of the checkpoint (headers only)."""
    if not os.path.isdir(path):
        raise ValueError(f"load_pretrained_sharded: {path} is not a checkpoint directory")
    index = os.path.join(path, _INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, _SINGLE)):
        names = [_SINGLE]
    else:
        raise ValueError(
            f"load_pretrained_sharded: {path} holds neither {_SINGLE} nor {_INDEX} (only "
            f"safetensors checkpoints are supported)"
        )
    header: dict[str, tuple[str, tuple[int, ...], torch.dtype]] = {}
    for name in names:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise ValueError(f"load_pretrained_sharded: {index} names {name}, which is missing")
        with _safe_open(file, torch.device("cpu")) as f:
            keys = f.keys()
            for key in keys:
                if key in header:
                    raise ValueError(
                        f"load_pretrained_sharded: {key} is in both {header[key][0]} and {file}"
                    )
                sl = f.get_slice(key)
                header[key] = (file, tuple(sl.get_shape()), _DTYPES.get(sl.get_dtype()))
    return header


# ----------------------------------------------------------------------------- the plan
def _rows_to_read(
    src: _Source, idx: int, g: _Group, full: torch.Tensor, rows
) -> str | slice | None:
    """What of ``src`` (the ``idx``-th tensor of its source pattern) this rank reads for the
    stacked expert parameter ``g.target`` of full shape ``full.shape``: one expert's tensor
    (``"all"`` if the expert is local, None if not), or the local rows of a stacked tensor."""
    E, local = rows
    if g.converter is not None and len(src.shape) == full.dim() - 1:
        # one tensor per expert, collected in expert order; a list filling several [E, ...]
        # targets back to back (text then vision experts) wraps around E, as in transformers
        return "all" if idx % E in local else None
    if src.shape and src.shape[0] == E:
        return slice(local.start, local.stop)
    raise ValueError(
        f"load_pretrained_sharded: checkpoint tensor {src.key} of shape {list(src.shape)} makes "
        f"{g.target}, which stacks {E} experts ({list(full.shape)}): it holds "
        + (f"{src.shape[0]} experts" if src.shape else "no expert dim")
        + f", not {E}; the checkpoint and the config disagree on the number of experts"
    )


def _check_expert_count(g: _Group, E: int) -> None:
    if g.converter is None:
        return
    for pattern, sources in g.sources.items():
        per_expert = [s for s in sources if not isinstance(s.read, slice)]
        if not per_expert:
            continue
        n = len(per_expert)
        if n % E or (len(g.converter.target_patterns) == 1 and n != E):
            raise ValueError(
                f"load_pretrained_sharded: the checkpoint holds {n} experts' {pattern!r} for "
                f"{g.target}, the model {E} (e.g. {per_expert[0].key}); the checkpoint and the "
                f"config disagree on the number of experts"
            )


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _read_shape(src: _Source) -> tuple[int, ...]:
    if isinstance(src.read, slice):
        return (src.read.stop - src.read.start, *src.shape[1:])
    return src.shape


def _check_shapes(g: _Group, model: nn.Module, state: dict, dropped: set[str]) -> set[str]:
    """Run ``g``'s conversion on meta tensors; check every result's shape against this rank's
    tensor. Returns the model keys ``g`` makes."""
    if g.converter is None:
        (src,) = next(iter(g.sources.values()))
        made = {g.target: torch.empty(_read_shape(src), device="meta")}
    else:
        made = _run_converter(
            g, model, lambda s: torch.empty(_read_shape(s), dtype=s.dtype, device="meta")
        )
    for name, value in made.items():
        if name in dropped:
            continue
        if name not in state:
            raise ValueError(
                f"load_pretrained_sharded: converting {_keys(g)} made {name}, which the model "
                f"does not have"
            )
        want = _local(state[name]).shape
        if tuple(value.shape) != tuple(want):
            raise ValueError(
                f"load_pretrained_sharded: {name} would be {list(value.shape)} from the "
                f"checkpoint ({_keys(g)}), this rank's tensor is {list(want)}"
            )
    return set(made)


def _keys(g: _Group) -> str:
    keys = [s.key for sources in g.sources.values() for s in sources]
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def _run_converter(g: _Group, model: nn.Module, read) -> dict[str, torch.Tensor]:
    """transformers' ``WeightConverter.convert`` on the tensors ``read(source)`` gives for the
    sources this rank reads (another rank's experts are left out, as transformers' own
    expert-parallel loading leaves them out)."""
    conv = copy.deepcopy(g.converter)
    for pattern, sources in g.sources.items():
        for s in sources:
            fetch = (lambda s=s: read(s)) if s.read is not None else (lambda: None)
            conv.add_tensor(g.target, s.key, pattern, fetch)
    out = conv.convert(g.target, model=_LocalShapes(model), config=model.config)
    return {k: v[0] if isinstance(v, list) else v for k, v in out.items()}


class _LocalShapes:
    """The ``model`` conversion ops see: ``get_parameter`` gives this rank's tensor (a DTensor's
    local rows, the shape the op's result must have: ``Transpose(check_dims=True)`` and ``Split``
    compare with it), without reading a sharded attribute (which raises outside compile)."""

    def __init__(self, model: nn.Module):
        self._model = model

    def get_parameter(self, target: str) -> torch.Tensor:
        path, _, leaf = target.rpartition(".")
        t = self._model.get_submodule(path)._parameters.get(leaf)
        if t is None:
            raise AttributeError(f"{type(self._model).__name__} has no parameter {target}")
        return _local(t)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


def _check_missing(model: nn.Module, state: dict, covered: set[str], path: str) -> None:
    """Every tensor of this rank's state dict comes from the checkpoint, or is tied to one that
    does, or is one the model lets be missing (then initialized as ``from_pretrained`` does)."""
    by_tensor = defaultdict(set)
    for k, v in state.items():
        by_tensor[id(v)].add(k)
    ignore = [
        re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
    ]
    missing = [
        k
        for k, v in state.items()
        if not (by_tensor[id(v)] & covered) and not any(p.search(k) for p in ignore)
    ]
    if missing:
        raise ValueError(
            f"load_pretrained_sharded: {path} provides no tensor for {len(missing)} of the "
            f"model's: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")
        )


def _warn_unexpected(model: nn.Module, unexpected: list[str], path: str) -> None:
    patterns = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    patterns.append(r"rotary_emb\.inv_freq")
    unexpected = [k for k in unexpected if not any(re.search(p, k) for p in patterns)]
    if unexpected:
        warnings.warn(
            f"load_pretrained_sharded: {len(unexpected)} tensors of {path} are not used by "
            f"{type(model).__name__}: {', '.join(unexpected[:5])}"
            + (" ..." if len(unexpected) > 5 else ""),
            stacklevel=3,
        )


# ----------------------------------------------------------------------------- memory and reads
def _allocate(model: nn.Module, device: torch.device) -> None:
    """``model.to_empty(device=device)``, but a DTensor's mesh takes ``device``'s type too (a mesh
    built on the meta device would keep saying "meta"), and tensors shared by several modules
    (tied embeddings) stay shared."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor

    shared = defaultdict(list)
    for mod in model.modules():
        for kind in ("_parameters", "_buffers"):
            for name, t in getattr(mod, kind).items():
                if t is not None:
                    shared[id(t)].append((mod, kind, name))
    meshes = {}

    def empty(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, DTensor):
            return torch.empty_like(t, device=device)
        pg = t.device_mesh.get_group()
        if pg.group_name not in meshes:
            meshes[pg.group_name] = DeviceMesh.from_group(pg, device.type)
        local = torch.empty(t.to_local().shape, dtype=t.dtype, device=device)
        return DTensor.from_local(
            local, meshes[pg.group_name], t.placements, run_check=False, shape=t.shape,
            stride=t.stride(),
        )  # fmt: skip

    model._apply(empty)
    for owners in shared.values():
        (mod0, kind0, name0), *rest = owners
        for mod, kind, name in rest:
            getattr(mod, kind)[name] = getattr(mod0, kind0)[name0]


def _convert(g: _Group, model, files: dict, stack: contextlib.ExitStack, device) -> dict:
    def read(s: _Source) -> torch.Tensor:
        if s.file not in files:
            files[s.file] = stack.enter_context(_safe_open(s.file, device))
        sl = files[s.file].get_slice(s.key)
        t = sl[...] if s.read == "all" else sl[s.read.start : s.read.stop]
        return t.to(device)

    if g.converter is None:
        (src,) = next(iter(g.sources.values()))
        return {g.target: read(src)}
    return _run_converter(g, model, read)


def _init_buffers(model: nn.Module, loaded: set[int]) -> None:
    """Non-persistent buffers (rotary ``inv_freq``, ...) and the keys the model lets be missing
    are not in the checkpoint: initialize them as ``from_pretrained`` does, with the model's
    ``_init_weights`` on the modules that own them, every loaded tensor marked initialized (the
    ``transformers.initialization`` functions leave those alone)."""
    from transformers import PreTrainedModel
    from transformers import initialization as init

    def own(mod: nn.Module) -> list[torch.Tensor]:
        return [t for t in (*mod._parameters.values(), *mod._buffers.values()) if t is not None]

    for mod in model.modules():
        for t in own(mod):
            if id(t) in loaded:
                t._is_hf_initialized = True
    todo = []  # (module, the PreTrainedModel whose _init_weights applies to it)

    def walk(mod: nn.Module, pretrained: nn.Module) -> None:
        if any(not getattr(t, "_is_hf_initialized", False) for t in own(mod)):
            todo.append((mod, pretrained))
        for child in mod.children():
            walk(child, child if isinstance(child, PreTrainedModel) else pretrained)

    walk(model, model)
    with torch.no_grad(), init.guard_torch_init_functions():
        for mod, pretrained in todo:
            pretrained._init_weights(mod)


def _load_generation_config(model: nn.Module, path: str) -> None:
    if not os.path.isfile(os.path.join(path, "generation_config.json")):
        return
    if getattr(model, "generation_config", None) is None:
        return
    from transformers import GenerationConfig

    with contextlib.suppress(OSError, ValueError):
        model.generation_config = GenerationConfig.from_pretrained(path)
