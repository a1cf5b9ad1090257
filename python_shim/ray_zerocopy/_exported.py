"""``torch.export`` programs sealed without their weights: the graph travels
as torch.export's own versioned JSON (every node's metadata included: what
``.module()`` needs, and what pickling the program loses), and its
``state_dict`` and ``constants`` are the tensors adopted from the sealed
buffer when the program is rebuilt.

The sealer calls :func:`reduce` for an ExportedProgram it meets; unpickling
the skeleton calls :func:`rebuild`. This module imports torch.export's
serializer (about a second in a fresh process), so a wrapper that holds a
program imports it when it arrives in an actor, not during ``load()``.
"""

from __future__ import annotations

import torch
from torch._export.serde import serialize as serde  # private; what torch.export.save/load use

from ._programs import check, meta, pack, placeholder, unpack
from .errors import InvalidInputError, InvalidTypeError, UnsupportedObjectError

# ---------------------------------------------------------------------------
# torch.export
# ---------------------------------------------------------------------------
#
# Why cloudpickle breaks it: ExportedProgram pickles its GraphModule with
# GraphModule.__reduce__, which keeps only the generated Python code and
# re-traces it with torch.fx at unpickle time. The re-traced graph's nodes
# have no node.meta (no 'val' FakeTensors, no stack traces, no nn_module_stack),
# and ExportedProgram.module() -> _unlift_exported_program_lifted_states reads
# node.meta['val'] of the placeholders/outputs: KeyError 'val'.
#
# What works: torch.export's own serializer (torch._export.serde.serialize,
# what torch.export.save uses) writes the graph, with every node's metadata,
# as JSON; it serializes state_dict/constants/example inputs separately and can
# skip them (serialize_state_dict=False, serialize_constants=False), and its
# deserializer accepts them as already-built dicts, which it puts into the new
# ExportedProgram as they are (no copy).


_SMALL_EXAMPLE_INPUTS = 64 * 1024


def _example_inputs_bytes(serde, ep, mode: str) -> bytes:
    """ExportedProgram.example_inputs travel in the blob: ``.module()`` uses
    them (only their pytree paths) to build its input guards. "keep": as they
    are; "placeholder": every tensor replaced by a one-element placeholder of
    its shape and dtype (values meaningless); "drop": none (no guards
    function); "auto": "keep" up to 64 KiB of tensor data, else "placeholder"."""
    ex = ep.example_inputs
    if ex is None or mode == "drop":
        return b""
    leaves = [x for x in torch.utils._pytree.tree_leaves(ex) if isinstance(x, torch.Tensor)]
    if mode == "auto":
        mode = "keep" if sum(t.numel() * t.element_size() for t in leaves) <= _SMALL_EXAMPLE_INPUTS else "placeholder"
    if mode == "placeholder":
        ex = torch.utils._pytree.tree_map_only(torch.Tensor, placeholder, ex)
    elif mode != "keep":
        raise InvalidInputError(f"example_inputs={mode!r}: expected auto, keep, placeholder or drop")
    return serde.serialize_torch_artifact(ex)


def strip(ep, example_inputs: str = "auto", writes: dict | None = None) -> tuple[bytes, dict[str, torch.Tensor]]:
    """An ExportedProgram -> (blob without weights, {name: tensor}) covering
    its state_dict (parameters, persistent buffers) and its tensor constants
    (lifted constants, non-persistent buffers). ``example_inputs``: see
    :func:`_example_inputs_bytes`; ``writes``: :func:`_writes` of ``ep``,
    where already found."""
    if not isinstance(ep, torch.export.ExportedProgram):
        raise InvalidTypeError(f"expected a torch.export.ExportedProgram, got {type(ep).__name__}")
    sig = ep.graph_signature
    writes = _writes(ep) if writes is None else writes
    mutated = set(sig.buffers_to_mutate.values()) | {t for t, ops in writes.items() if ops - _INFERENCE_WRITES}
    if mutated:
        # Running it writes into those tensors: shared read-only weights
        # would fault (or, unguarded, change every process's copy).
        raise InvalidInputError(
            f"the program mutates buffers {sorted(mutated)[:5]} when it runs (BatchNorm in training mode, an "
            "in-place op on a buffer or on a view of it): shared read-only weights cannot take that. Export the "
            "model in eval mode, or have it write a copy (buffer.clone()) instead"
        )
    params = set(sig.parameters)
    key_of: dict[int, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    sites = []  # (where, name, key): where in {"state_dict", "constants"}
    is_param: dict[str, bool] = {}
    for where, items in (("state_dict", ep.state_dict.items()), ("constants", ep.constants.items())):
        for name, t in items:
            if not isinstance(t, torch.Tensor):
                raise UnsupportedObjectError(
                    f"{where}[{name!r}] is a {type(t).__name__} (torchbind object): not supported"
                )
            if t.layout != torch.strided or t.is_quantized:
                raise UnsupportedObjectError(f"{where}[{name!r}]: layout {t.layout} / quantized not supported")
            key = key_of.get(id(t))
            if key is None:
                key = key_of[id(t)] = name
                if key in tensors:  # a constant named like a state_dict entry
                    key = key_of[id(t)] = f"constants.{name}"
                tensors[key] = t
            sites.append((where, name, key))
            is_param[key] = is_param.get(key, False) or (where == "state_dict" and name in params)
    metas = {k: {**meta(t), "device": str(t.device), "param": is_param[k]} for k, t in tensors.items()}
    art = serde.serialize(ep, serialize_state_dict=False, serialize_constants=False, serialize_example_inputs=False)
    blob = pack(
        "export",
        {
            "program": art.exported_program,  # JSON, with every node's metadata
            "example_inputs": _example_inputs_bytes(serde, ep, example_inputs),  # torch.save bytes
            "sites": sites,
            "metas": metas,
        },
    )
    return blob, tensors


# The in-place ops of a graph that write state in eval mode too, as the
# module they come from does: the state they write is copied by each
# process that loads (:func:`written`). Any other write of state (a
# BatchNorm's running statistics, in training mode) is refused by strip.
_INFERENCE_WRITES = {"aten::embedding_renorm_"}  # nn.Embedding(max_norm=...)


def written(ep, writes: dict | None = None) -> list[torch.Tensor]:
    """The parameters, buffers and constants the program writes in place in
    inference (an exported ``nn.Embedding(max_norm=...)`` renormalizes its
    weight by ``embedding_renorm_`` on every call): each is copied by every
    process that loads, as for the module itself. ``writes``: as for
    :func:`strip`."""
    writes = _writes(ep) if writes is None else writes
    state = {**ep.constants, **ep.state_dict}
    targets = sorted(t for t, ops in writes.items() if ops <= _INFERENCE_WRITES)
    return [state[t] for t in targets if isinstance(state.get(t), torch.Tensor)]


def _writes(ep) -> dict[str, set]:
    """``{target: ops}``: the parameters, buffers and constants in-place ops
    of the graph write (export's training IR keeps ops like ``add_`` on a
    buffer as they are), with the names of the ops that write each.

    A write reaches state through whatever shares its memory: a view of it
    (``detach``, ``t``, a slice, an item of ``split`` or ``unbind``), so
    ``embedding_renorm_`` of ``detach(weight)`` writes the weight, though
    the signature lists no mutation. Whether a tensor of the graph shares a
    state tensor's memory is read from the fake tensors export records on
    each node (``meta["val"]``: one storage for a view and its base), not
    from the ops' schemas, which say only that ``to``, ``contiguous`` or
    ``reshape`` *may* return their argument: a copy made by one of them
    and then written (a dequantizing layer's ``w = q.to(float32);
    w.mul_(scale)``) writes no state. A node without that record counts
    as the state tensor only where it is that tensor's own placeholder."""
    from torch.export.graph_signature import InputKind
    from torch.multiprocessing.reductions import StorageWeakRef

    def storage(node):
        val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        if not isinstance(val, torch.Tensor):
            return None
        try:
            return StorageWeakRef(val.untyped_storage())
        except (RuntimeError, NotImplementedError):  # a layout without a storage
            return None

    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    by_name: dict[str, str] = {}  # a state placeholder's name -> its target
    by_storage: dict = {}  # the storage of a state placeholder's fake tensor -> targets
    for spec in ep.graph_signature.input_specs:
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            by_name[spec.arg.name] = spec.target
            st = storage(placeholders.get(spec.arg.name))
            if st is not None:
                by_storage.setdefault(st, []).append(spec.target)
    out: dict[str, set] = {}
    for node in ep.graph.nodes:
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        if schema is None:
            continue
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            for v in value if isinstance(value, (list, tuple)) else (value,):
                if not isinstance(v, torch.fx.Node):
                    continue
                st = storage(v)
                targets = by_storage.get(st, ()) if st is not None else [by_name[v.name]] if v.name in by_name else ()
                for target in targets:
                    out.setdefault(target, set()).add(schema.name)
    return out


def _as_param(t: torch.Tensor) -> torch.nn.Parameter:
    """``nn.Parameter(t, requires_grad=False)`` sharing t's storage (no copy, no write)."""
    if isinstance(t, torch.nn.Parameter) and not t.requires_grad:
        return t
    return torch.nn.Parameter(t.detach(), requires_grad=False)


def rebuild(blob: bytes, tensors: dict[str, torch.Tensor]):
    """blob + {name: tensor} -> ExportedProgram whose state_dict / constants
    are the supplied tensors (parameters as requires_grad=False
    nn.Parameter views of them: same storage, same data_ptr)."""
    d = unpack(blob, "export")
    metas = d["metas"]
    check(tensors, metas)
    # one object per distinct tensor: tied entries stay the same object
    objs = {k: _as_param(tensors[k]) if m["param"] else tensors[k] for k, m in metas.items()}
    state_dict, constants = {}, {}
    for where, name, key in d["sites"]:
        (state_dict if where == "state_dict" else constants)[name] = objs[key]
    art = serde.SerializedArtifact(
        d["program"],
        state_dict,  # dicts are taken as they are (deserialize_torch_artifact)
        constants,
        d["example_inputs"],
    )
    return serde.deserialize(art)


def reduce(program):
    """What the sealer pickles an ExportedProgram as: :func:`rebuild` with
    the blob and the program's tensors (which the sealer turns into
    references to the sealed buffer); and the tensors running it writes in
    inference (:func:`written`), which each loading process copies. The
    graph's writes are found once, for both."""
    writes = _writes(program)
    return rebuild, strip(program, writes=writes), written(program, writes)
