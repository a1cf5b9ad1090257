"""TorchScript modules (``torch.jit.script`` / ``torch.jit.trace`` results)
sealed without their weights: the code travels as a small TorchScript archive
whose tensor slots hold one-element placeholders, and every tensor slot (and
large graph constant) is set to the tensor adopted from the sealed buffer
when the module is rebuilt. The rebuilt module's tensors are those tensors
themselves: nothing is copied or written.

The sealer calls :func:`reduce` for a ScriptModule it meets; unpickling the
skeleton calls :func:`rebuild`.
"""

from __future__ import annotations

import io
import threading

import torch

from ._programs import check, meta, pack, placeholder, unpack
from .errors import InternalError, InvalidTypeError, UnsupportedObjectError

# ---------------------------------------------------------------------------
# TorchScript
# ---------------------------------------------------------------------------
#
# A ScriptModule is a C++ object graph (torch._C.ScriptModule, one per
# submodule) whose tensors live in attribute slots; pickle refuses it
# ("does not have a __getstate__ method"), but torch.jit.save/load serialize
# it completely: code, types, constants, attribute values. So:
#   strip: put a placeholder (a one-element tensor expanded to the real shape,
#          stride 0: 1 element of storage) in every tensor slot, torch.jit.save
#          to bytes, put the original tensors back;
#   rebuild: torch.jit.load the bytes (allocates only the placeholders' one
#          element each), then set every tensor slot to the supplied tensor.
# Tensor slots = parameters, buffers and plain tensor attributes (a scripted
# module's unregistered tensor attributes are attributes, not buffers).

_script_lock = threading.Lock()  # strip mutates the module's slots for the duration of the save


def _script_tensor_slots(module) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, tuple]]]:
    """(dotted path, tensor) for every tensor-valued attribute slot of every
    submodule, including aliases (the same tensor under several paths); and
    (dotted path, tensors) for every attribute that is a list or tuple of
    tensors (a scripted ``nn.LSTM``'s ``_flat_weights``, which holds its
    parameters)."""
    try:
        # Private (debug) binding, but the only one listing *all* attributes
        # of a torch._C.ScriptModule (RecursiveScriptModule exposes only
        # parameters and buffers). Present since torch 1.4.
        attrs = torch._C._jit_debug_module_iterators(module._c)["named_attributes_r"]
    except (AttributeError, KeyError):  # fallback: parameters and buffers only
        attrs = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    slots, lists = [], []
    for path, value in attrs:
        if isinstance(value, torch.Tensor):
            slots.append((path, value))
        elif isinstance(value, (list, tuple)) and value and all(isinstance(x, torch.Tensor) for x in value):
            lists.append((path, tuple(value)))
        elif isinstance(value, (list, tuple, dict)) and _contains_tensor(value):
            raise UnsupportedObjectError(
                f"TorchScript attribute {path!r} is a container of tensors other than a flat list or tuple: "
                "not supported"
            )
    return slots, lists


def _contains_tensor(v) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, dict):
        return any(_contains_tensor(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return any(_contains_tensor(x) for x in v)
    return False


def _slot_owner(root_c, path: str):
    """The torch._C.ScriptModule owning attribute ``path`` and the attribute name."""
    *mods, attr = path.split(".")
    owner = root_c
    for name in mods:
        owner = owner.getattr(name)
    return owner, attr


# Tensors embedded in the code as constants (prim::Constant nodes): what a
# traced module makes of tensors that are not parameters/buffers (a plain
# tensor attribute, a torch.tensor(...) built in forward), and where
# torch.jit.freeze puts *all* weights. Those of at least CONSTANT_MIN_BYTES
# are stripped too: each constant node's value is swapped for a placeholder
# (one element, expanded: stride 0) whose *value* tells which constant it is
# (the saver deduplicates constants that compare equal, so the value must
# differ; storage offsets do not survive); after loading, a constant node
# holding such a placeholder gets the supplied tensor as its value (Node.t_),
# before the method first runs (the executor copies the graph on first run).
CONSTANT_MIN_BYTES = 4096  # _seal names it in its "no tensors" message


def _constant_nodes(module):
    """(path, method, node) for every tensor-valued prim::Constant in the
    graphs of every method of every submodule (blocks included)."""

    def walk(block_or_graph):
        for node in block_or_graph.nodes():
            if node.kind() == "prim::Constant" and node.hasAttribute("value") and node.kindOf("value") == "t":
                yield node
            for b in node.blocks():
                yield from walk(b)

    for path, sub in module.named_modules(remove_duplicate=False):
        for mname in sub._c._method_names():
            for node in walk(sub._c._get_method(mname).graph):
                yield path, mname, node


# the largest integer a dtype holds exactly (placeholder values 1..this)
_EXACT = {torch.float32: 2**24, torch.float64: 2**53, torch.float16: 2048, torch.bfloat16: 256,
          torch.int64: 2**62, torch.int32: 2**31 - 1, torch.int16: 2**15 - 1, torch.int8: 127, torch.uint8: 255}


def _tag(t: torch.Tensor):
    """(dtype, shape, value) of a stride-0 tensor, else None."""
    if t.dim() == 0 or t.numel() < 2 or any(st != 0 for st in t.stride()) or t.dtype not in _EXACT:
        return None
    return (t.dtype, tuple(t.shape), int(t.reshape(-1)[0].item()))


def _constant_placeholder(t: torch.Tensor, used: dict) -> tuple[torch.Tensor, tuple] | None:
    """A placeholder for constant t, distinct from every other placeholder of
    its dtype and shape; None where the dtype has no room (bool, complex...)."""
    group = (t.dtype, tuple(t.shape))
    v = used.get(group, 0) + 1
    if t.dtype not in _EXACT or v > _EXACT[t.dtype] or t.numel() < 2:
        return None
    used[group] = v
    ph = torch.full((), v, dtype=t.dtype).expand(t.shape)
    return ph, (t.dtype, tuple(t.shape), v)


def strip(module, constant_min_bytes: int | None = CONSTANT_MIN_BYTES) -> tuple[bytes, dict[str, torch.Tensor]]:
    """A TorchScript module (torch.jit.script / torch.jit.trace result, or
    torch.jit.load) -> (blob without weights, {name: tensor}).
    ``constant_min_bytes``: graph constants this large or larger are stripped
    too (named ``<module path>:<method>:const<i>``); None: none are."""
    if not isinstance(module, torch.jit.ScriptModule):
        raise InvalidTypeError(f"expected a torch.jit.ScriptModule, got {type(module).__name__}")
    slots, lists = _script_tensor_slots(module)
    key_of: dict[int, str] = {}  # id(tensor) -> name
    tensors: dict[str, torch.Tensor] = {}
    placeholders: dict[int, torch.Tensor] = {}

    def key_for(t, path):
        key = key_of.get(id(t))
        if key is None:
            key = key_of[id(t)] = path
            tensors[key] = t
            placeholders[id(t)] = placeholder(t)
        return key

    layout = [(path, key_for(t, path)) for path, t in slots]  # (path, key)
    # (path, keys, is a tuple): a list's tensors are mostly the parameters
    # under other names (an LSTM's _flat_weights), then the same keys.
    list_layout = [
        (path, [key_for(t, f"{path}.{i}") for i, t in enumerate(ts)], isinstance(ts, tuple)) for path, ts in lists
    ]
    originals = {}  # path -> the list attribute's value, put back after the save
    for path, _ in lists:
        owner, attr = _slot_owner(module._c, path)
        originals[path] = owner.getattr(attr)
    # graph constants
    const_nodes = []  # (node, original tensor, key)
    const_keys: list[str] = []
    const_ph: dict[str, tuple] = {}  # key -> (placeholder, tag)
    used: dict = {}
    if constant_min_bytes is not None:
        n = 0
        for path, mname, node in _constant_nodes(module):
            t = node.t("value")
            if t.numel() * t.element_size() < constant_min_bytes or t.layout != torch.strided or t.is_quantized:
                continue
            if not node.output().uses():  # dead: not saved at all
                continue
            key = key_of.get(id(t))
            if key is None or key not in const_ph:
                # a new tensor, or one already in an attribute slot (then the
                # constant gets a placeholder of its own, the same key)
                ph = _constant_placeholder(t, used)
                if ph is None:  # stays in the blob
                    continue
                if key is None:
                    key = key_of[id(t)] = f"{path}:{mname}:const{n}"
                    n += 1
                    tensors[key] = t
                const_keys.append(key)
                const_ph[key] = ph
            const_nodes.append((node, t, key))
    metas = {k: {**meta(t), "device": str(t.device), "requires_grad": t.requires_grad} for k, t in tensors.items()}

    buf = io.BytesIO()
    with _script_lock:
        done, done_nodes = [], []
        try:
            for path, t in slots:
                owner, attr = _slot_owner(module._c, path)
                owner.setattr(attr, placeholders[id(t)])
                done.append((owner, attr, t))
            for path, ts in lists:
                owner, attr = _slot_owner(module._c, path)
                stand_in = [placeholders[id(t)] for t in ts]
                owner.setattr(attr, tuple(stand_in) if isinstance(ts, tuple) else stand_in)
                done.append((owner, attr, originals[path]))
            for node, t, key in const_nodes:
                node.t_("value", const_ph[key][0])
                done_nodes.append((node, t))
            torch.jit.save(module, buf)
        finally:  # put the very same tensor objects back
            for owner, attr, t in reversed(done):
                owner.setattr(attr, t)
            for node, t in reversed(done_nodes):
                node.t_("value", t)
    blob = pack(
        "torchscript",
        {
            "archive": buf.getvalue(),
            "layout": layout,
            "lists": list_layout,
            "constants": {const_ph[k][1]: k for k in const_keys},  # placeholder tag -> key
            "metas": metas,
        },
    )
    return blob, tensors


def rebuild(blob: bytes, tensors: dict[str, torch.Tensor], map_location=None):
    """blob + {name: tensor} -> a RecursiveScriptModule whose tensor slots
    (and stripped graph constants) are exactly the supplied tensor objects.
    ``map_location``: for torch.jit.load, i.e. for what stays in the blob
    (small graph constants; the placeholders are CPU tensors anyway)."""
    d = unpack(blob, "torchscript")
    metas = d["metas"]
    check(tensors, metas)
    # The placeholders were saved as CPU tensors: loading allocates one
    # element each. The module's tensors are those supplied, on their device.
    module = torch.jit.load(io.BytesIO(d["archive"]), map_location=map_location)
    for path, key in d["layout"]:
        owner, attr = _slot_owner(module._c, path)
        owner.setattr(attr, tensors[key])
    for path, keys, is_tuple in d.get("lists", ()):
        owner, attr = _slot_owner(module._c, path)
        ts = [tensors[k] for k in keys]
        owner.setattr(attr, tuple(ts) if is_tuple else ts)
    tags = d["constants"]
    if tags:
        found = set()
        for _, _, node in _constant_nodes(module):
            key = tags.get(_tag(node.t("value")))
            if key is not None:
                node.t_("value", tensors[key])
                found.add(key)
        if found != set(tags.values()):
            raise InternalError(f"graph constants not found after loading: {sorted(set(tags.values()) - found)[:5]}")
    return module.eval()


def reduce(module):
    """What the sealer pickles a ScriptModule as: :func:`rebuild` with the
    blob and the module's tensors (which the sealer turns into references to
    the sealed buffer); and the tensors it writes in inference (none are
    known: see ``_exported.reduce``)."""
    return rebuild, strip(module), ()


