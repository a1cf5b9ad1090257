"""New versions of a sealed pipeline that store only what changed.

A version's tensors come from one or more *parts*, each its own sealed
buffer (its own object, content digest and share key): a wrapper made by
``ActorWrapper(...)`` has one; ``ActorWrapper.update`` seals a new version
whose own part, the *delta*, holds only the tensors that differ from the
base version's, and whose skeleton refers to every other tensor as
``(part, index)`` in the parts the base already has (``Sealed.sources``).

A tensor of the new version is the base's when it has the same dtype, shape
and bytes as the base tensor it stands for:

- by identity: its memory is the base tensor's own (the base pipeline
  loaded in this process, some tensors replaced), found by address without
  reading a byte;
- else by comparing its bytes with the base tensor of the same name, at
  memory speed. Never by a hash alone: equal hashes are not equal bytes.

Only the parts the new version still refers to are kept, so a part no longer
used is freed once the versions that used it are dropped.
"""

from __future__ import annotations

import sys

import numpy as np

from . import _load, _telemetry
from ._native import DTYPE_CODES, DTYPE_NAMES
from ._seal import Packing, _Sealer, _torch_reducer, kind_of, packing_of
from ._skeleton import imported_adapters, walk
from .errors import InvalidInputError, listed
from .packing import PackInput, view_at

__all__ = ["parts_of", "pack_update"]

_NEW = -1  # the part of a tensor the delta stores, before parts are numbered
_CHUNK = 8 << 20  # bytes compared at once: equal-sized temporaries stay small


def parts_of(wrapper) -> tuple[_load.Part, ...]:
    """Every part of ``wrapper``'s version, base first, its own buffer last."""
    sealed = wrapper._sealed
    own = len(wrapper._parts)
    count = len(sealed.kinds) if sealed.sources is None else sum(1 for p, _ in set(sealed.sources) if p == own)
    mine = _load.Part(wrapper._ref, sealed.nbytes, sealed.content_digest, count, wrapper._share_key)
    return (*wrapper._parts, mine)


def _equal(a: int, b: int, nbytes: int) -> bool:
    """Whether ``nbytes`` bytes at ``a`` and at ``b`` are equal."""
    x, y = view_at(a, nbytes), view_at(b, nbytes)
    return all(np.array_equal(x[i : i + _CHUNK], y[i : i + _CHUNK]) for i in range(0, nbytes, _CHUNK))


class _Base:
    """The base version's tensors in its opened parts, each as ``(part,
    index)``: by address and by name. The tensors the base version uses come
    first; then the others its parts hold (a tensor an earlier version had,
    e.g. a change reverted), so none is copied again."""

    def __init__(self, opened: list, sealed):
        self.opened = opened
        used = sealed.sources or tuple((0, j) for j in range(len(sealed.kinds)))
        every = ((p, j) for p, w in enumerate(opened) for j in range(len(w)))
        self.by_address: dict[tuple, tuple] = {}
        self.by_name: dict[str, list] = {}
        for p, j in dict.fromkeys((*used, *every)):
            w = opened[p]
            t = w.table()[j]
            entry = (p, j, w.address + t.offset, t)
            self.by_address.setdefault((entry[2], t.dtype, tuple(t.shape)), entry)
            self.by_name.setdefault(t.name, []).append(entry)
        self.identical = self.compared = 0

    def match(self, inp, name: str):
        """``(part, index)`` of the base tensor equal to pack input ``inp``
        (the tensor named ``name``), or None."""
        dtype, shape = DTYPE_NAMES[inp.dtype], tuple(inp.shape)
        hit = self.by_address.get((inp.address, dtype, shape))
        if hit is not None:
            self.identical += 1
            return hit[:2]
        for p, j, address, t in self.by_name.get(name, ()):
            if t.dtype == dtype and tuple(t.shape) == shape and _equal(inp.address, address, inp.nbytes):
                self.compared += 1
                return p, j
        return None


class _DeltaSealer(_Sealer):
    """Pickles the new version: each tensor becomes a reference to the base
    tensor equal to it, or to a new entry of the delta. ``substitute`` maps
    ``id(tensor)`` of the pickled object to ``(value, pack input, alive,
    tensor)`` that stands in its place (a state dict applied onto the
    base); ``follows``, ``id(tensor)`` to ``(base, offset)`` of tensors
    sealed as views of a base given a new value; ``swapped``, ``id(tensor)``
    of a tensor subclass made of inner tensors (torchao's quantized weights)
    to ``(value, tensor)``: the new value of that class pickled in its place
    (see :meth:`_reduce_swapped`)."""

    def __init__(self, obj, base: _Base, substitute: dict, follows: dict | None = None, swapped: dict | None = None):
        super().__init__(obj)
        self.base, self.substitute = base, substitute
        self.swapped = swapped or {}
        # A tensor given a new value is sealed as that value; one on the
        # memory of a base given a new value stays (or becomes, where
        # ``follows`` says) a view of it, whose new value is the memory's
        # (``_write_through``). A view of a tensor that became a view
        # views that one's base.
        self.views = {k: (b, off) for k, (b, off) in self.views.items() if k not in substitute}
        self.views.update(follows or {})
        # New values that are one tensor's memory (a tied pair's, as every
        # state dict of a tied model gives them): the first is sealed, the
        # others are views of it, as in the base. Plain contiguous values
        # only: a view's strides are its base's memory's, a value in another
        # layout is sealed in its memory order, and a lazy conjugate is not
        # the values of its memory.
        first: dict = {}
        torch = sys.modules.get("torch")
        plain = () if torch is None else (torch.Tensor, torch.nn.Parameter)
        for k, (value, _, _, slot) in substitute.items():
            if type(value) in plain and _is_its_memory(value) and k not in self.own_ids:
                key = (value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
                if first.setdefault(key, slot) is not slot:
                    self.views[k] = (first[key], 0)
        # A view whose base became a view itself views that one's base.
        for k in list(self.views):
            base, offset = self.views[k]
            while id(base) in self.views:
                base, more = self.views[id(base)]
                offset += more
            self.views[k] = (base, offset)
        self.sources: list[tuple[int, int]] = []  # per reference

    def value_of(self, t):
        sub = self.substitute.get(id(t))
        return t if sub is None else sub[0]

    def _reducer(self):
        self._torch_reduce = _torch_reducer()
        return self._reduce_swapped if self.swapped else self._torch_reduce

    def _reduce_swapped(self, o, sealer, proto: int):
        """The torch reducer, except for a tensor subclass given a new value
        (``swapped``): the new value is pickled in its place as the torch
        reducer pickles such a tensor (its inner tensors become references,
        named after the tensor, so each is matched with the base's inner
        tensor of its name; the subclass is rebuilt around them on load),
        a parameter where the base's tensor is one."""
        swap = self.swapped.get(id(o))
        if swap is None:
            return self._torch_reduce(o, sealer, proto)
        from . import _torch_seal

        value, slot = swap
        self.keep.append(value)  # its inner tensors' ids stay theirs until packed
        return _torch_seal.reduce_wrapper_subclass(value, self, slot)

    def _take(self, o, entry) -> int:
        """A new reference for tensor ``o``: the base's equal tensor, or a
        new entry of the delta."""
        fw, adapter = entry
        name = self.known.get(id(o)) or f"tensor.{len(self.sources)}"
        sub = self.substitute.get(id(o))
        inp, alive = sub[1:3] if sub is not None else adapter.pack_input(o, name)
        hit = self.base.match(inp, name)
        if hit is None:
            while inp.name in self.used_names:
                inp.name += "_"
            self.used_names.add(inp.name)
            hit = (_NEW, len(self.inputs))
            self.inputs.append(inp)
        # Kept alive whether or not the base has it: ``refs`` is keyed by
        # id(o), and an array the pickling made (a ``__reduce__`` that returns
        # a fresh one) would otherwise be freed and its id reused by the
        # next, which would then take this one's reference: wrong weights.
        self.keep.extend((o, alive))
        self.refs[id(o)] = len(self.sources)
        self.sources.append(hit)
        self.kinds.append(kind_of(o, fw))  # the slot's kind: a parameter stays a parameter
        return len(self.sources) - 1


def _fold_sparse_parts(sealer: _DeltaSealer, base: _Base) -> int:
    """Copies into the delta the tensors the new version takes from a part
    it uses less than half of (by its tensors' bytes), instead of keeping that part for
    them. A chain of updates kept every earlier part it took one tensor
    from: 16 updates of a 16-layer model, the k-th changing layers k to 15,
    left the newest version holding 16 parts, 8.5 times its size, for as
    long as it lived. Now a version holds at most twice its own bytes,
    whatever its history; the parts stay as long as other versions use
    them. Returns how many tensors were copied."""
    taken: dict = {}  # (part, index) -> its bytes, each once
    for p, j in sealer.sources:
        if p != _NEW and (p, j) not in taken:
            taken[(p, j)] = base.opened[p].table()[j].nbytes
    used: dict = {}
    for (p, _), nbytes in taken.items():
        used[p] = used.get(p, 0) + nbytes
    sparse = {p for p, nbytes in used.items() if 2 * nbytes < sum(t.nbytes for t in base.opened[p].table())}
    if not sparse:
        return 0
    moved: dict = {}  # (part, index) -> its entry in the delta
    for i, (p, j) in enumerate(sealer.sources):
        if p not in sparse:
            continue
        k = moved.get((p, j))
        if k is None:
            w = base.opened[p]
            t = w.table()[j]
            name = t.name
            while name in sealer.used_names:
                name += "_"
            sealer.used_names.add(name)
            k = moved[(p, j)] = len(sealer.inputs)
            sealer.inputs.append(PackInput(name, DTYPE_CODES[t.dtype], tuple(t.shape), w.address + t.offset, t.nbytes))
        sealer.sources[i] = (_NEW, k)
    sealer.keep.extend(base.opened[p] for p in sparse)  # what the fill copies from
    return len(moved)


def _is_state_dict(new: dict, pipeline, slots: dict, adapters) -> bool:
    """Whether dict ``new`` is a state dict to apply onto the base
    ``pipeline`` (whose tensors by name are ``slots``), not a whole new
    pipeline; refused where it could be either.

    A dict is never silently taken for a pipeline it does not look like: a
    state dict whose values are not all plain tensors (torchao's quantized
    weights, tensor subclasses made of inner tensors) became the new version
    itself, and actors then called a dict; one with a stray entry (``{"a":
    t, "note": "v2"}`` over ``{"a": .., "b": ..}``) became a pipeline that
    had lost ``b``. So, in order:

    - every value a plain tensor or array: a state dict, as always (a name
      the base lacks is an error that names it);
    - every key a name of a tensor of the base: a state dict, whatever the
      values (a tensor subclass is applied, anything else is an error that
      names it);
    - the base is a dict and ``new`` has every key of it: the whole new
      pipeline (of the same form; entries may be added);
    - no key names a tensor of the base: for a dict base, the whole new
      pipeline; for any other (a module), refused: a dict is no new version
      of it (a training checkpoint, ``{"state_dict": sd, "epoch": 3}``);
    - else (names of the base's tensors beside other entries, or some of a
      dict base's keys but not all): refused, naming the entries, with how to
      do either. A dict base is not updated entry by entry (``dict.update``)
      either: that would keep, silently, what a new pipeline meant to drop;
      ``{**version.load(), **changes}`` is that, at no copy."""
    if all(isinstance(k, str) and any(a.accepts(v) for _, a in adapters) for k, v in new.items()):
        return True
    unknown = [k for k in new if k not in slots]
    if not unknown:
        return True
    top = set(pipeline) if isinstance(pipeline, dict) else set()
    if top and top <= set(new):
        return False
    named = [k for k in new if k in slots or k in top]
    if not named and isinstance(pipeline, dict):
        return False
    if not named:
        # A dict is no new version of a module (or any pipeline not a dict):
        # a training checkpoint holding a state dict ({"state_dict": sd,
        # "epoch": 3}) became the new version itself, and actors called a dict.
        shown = listed(new)
        raise InvalidInputError(
            f"update: the base pipeline is a {type(pipeline).__name__}, and this dict names none of its tensors "
            f"({shown}). To give tensors new values, pass them by the names of its state dict (e.g. "
            f"{listed(list(slots)[:3])}); from a checkpoint that holds a state dict, pass that "
            "state dict (update(ckpt['state_dict'])); to make a pipeline of another form, wrap it: ActorWrapper(new)"
        )
    raise InvalidInputError(_ambiguous(new, pipeline, slots, named, unknown, adapters))


def _ambiguous(new: dict, pipeline, slots: dict, named: list, unknown: list, adapters) -> str:
    """Why dict ``new`` is refused (see :func:`_is_state_dict`): its entries
    named, and how to do either thing it might mean."""

    def what(k) -> str:
        return f"{k!r} (a tensor)" if _is_tensor(new[k], adapters) else f"{k!r} (a {type(new[k]).__name__})"

    others = listed(unknown, show=what)
    examples = listed(list(slots)[:3])
    if isinstance(pipeline, dict):
        missing = [k for k in pipeline if k not in new]
        head = (
            f"update: the dict gives {listed(named)} of the base pipeline (a dict) but not "
            f"{listed(missing)}, beside {others}"
        )
        whole = (
            "to replace the pipeline, pass the whole new dict, with every key of the base "
            "(version.update({**version.load(), ...}) keeps the entries not given, their tensors "
            "recognised without a copy)"
        )
    else:
        head = f"update: the dict gives tensors of the base by name ({listed(named)}) beside {others}"
        whole = "to replace the pipeline, pass the whole new pipeline object (e.g. the fine-tuned model itself)"
    return (
        f"{head}: it is neither a state dict nor a whole pipeline of the base's form. To give tensors new "
        f"values, pass only tensors, by the names of the base's state dict (e.g. {examples}); {whole}"
    )


def _is_tensor(v, adapters) -> bool:
    """Whether ``v`` is a tensor or array: one an adapter takes, or any torch
    tensor (a subclass made of inner tensors included)."""
    torch = sys.modules.get("torch")
    return any(a.accepts(v) for _, a in adapters) or (torch is not None and isinstance(v, torch.Tensor))


def _slots(obj, adapters) -> dict:
    """Every tensor of ``obj`` by every name it has: state-dict names
    (parameters and buffers, tied ones under each name) for modules, the
    attribute/key path for other tensors and arrays (a torch tensor
    subclass made of inner tensors by its own path, not its inner ones')."""
    torch = sys.modules.get("torch")

    def is_leaf(o):
        return (torch is not None and isinstance(o, (torch.nn.Module, torch.Tensor))) or any(
            a.accepts(o) for _, a in adapters
        )

    out: dict = {}
    for path, leaf in walk(obj, is_leaf):
        if torch is not None and isinstance(leaf, torch.nn.Module):
            for n, t in [
                *leaf.named_parameters(prefix=path, remove_duplicate=False),
                *leaf.named_buffers(prefix=path, remove_duplicate=False),
            ]:
                out.setdefault(n, t)
        else:
            out.setdefault(path or "tensor", leaf)
    return out


def _substitutes(slots: dict, state: dict, adapters) -> tuple[dict, dict, dict]:
    """What each tensor of the base pipeline (its tensors by name:
    ``slots``) named in ``state`` is replaced by, checked: every name is one
    of the pipeline's, every value of the slot's framework (and class, for a
    tensor subclass made of inner tensors), dtype and shape, tied names
    given one value; the tensors that follow a base given a new value (see
    :func:`_write_through`); and the tensor subclasses given a new value
    (``_DeltaSealer``'s ``swapped``)."""
    out: dict = {}
    swapped: dict = {}
    named: dict[int, str] = {}
    for name, value in state.items():
        slot = slots.get(name)
        if slot is None:
            some = ", ".join(repr(n) for n in list(slots)[:5])
            raise InvalidInputError(
                f"update: the base pipeline has no tensor {name!r} (its names are those of its state dict, e.g. {some})"
            )
        if not _is_tensor(value, adapters):
            raise InvalidInputError(
                f"update: {name!r} names a tensor of the base, but its new value is a {type(value).__name__}, "
                "not a tensor: a state dict gives tensors only; to replace the pipeline, pass the whole new "
                "pipeline object instead"
            )
        if _wrapper_subclass(slot):
            _swap(swapped, named, name, slot, value)
            continue
        found = next((e for e in adapters if e[1].accepts(slot)), None)
        if found is None:
            raise InvalidInputError(
                f"update: the base's tensor {name!r} is a {type(slot).__name__}, which a state-dict update cannot "
                "replace: pass the whole new pipeline instead"
            )
        fw, adapter = found
        if not adapter.accepts(value):
            raise InvalidInputError(
                f"update: tensor {name!r} is a {fw} tensor in the base, not a {type(value).__name__}: a state "
                "dict cannot change a tensor's kind; to do that, pass the whole new pipeline instead"
            )
        old, _ = adapter.pack_input(slot, name)
        inp, alive = adapter.pack_input(value, name)
        if inp.dtype != old.dtype or tuple(inp.shape) != tuple(old.shape):
            raise InvalidInputError(
                f"update: tensor {name!r} is {DTYPE_NAMES[old.dtype]} {list(old.shape)} in the base, "
                f"the new value {DTYPE_NAMES[inp.dtype]} {list(inp.shape)}"
            )
        if (laid := _in_layout_of(slot, value)) is not value:
            value = laid
            inp, alive = adapter.pack_input(value, name)
        prev = out.get(id(slot))
        if prev is not None and prev[0] is not value and not _equal(prev[1].address, inp.address, inp.nbytes):
            raise InvalidInputError(
                f"update: {named[id(slot)]!r} and {name!r} are one tied tensor in the base, "
                "but the state dict gives them different values"
            )
        out[id(slot)] = (value, inp, alive, slot)
        named.setdefault(id(slot), name)
    return (*_write_through(slots, out, named), swapped)


def _in_layout_of(slot, value):
    """``value`` in the memory layout of the base's torch tensor ``slot``,
    as ``load_state_dict`` leaves it (it copies a value into the base's
    tensor): a value given in another order (a transposed copy, a
    ``channels_last`` copy of a contiguous weight, or the reverse) loaded
    with strides the model never had, and code that views its weight
    (``weight.view(-1)``) failed on it. A copy only where the layouts
    differ and the base's is dense (contiguous or permuted); a broadcast or
    gapped base, which ``load_state_dict`` cannot write either, keeps the
    value as given. Dimensions of one element have no layout."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(value, torch.Tensor):
        return value
    from . import _torch

    if type(slot) not in _torch._PLAIN:
        return value
    if all(a == b for n, a, b in zip(slot.shape, slot.stride(), value.stride(), strict=True) if n > 1):
        return value
    if not slot.is_contiguous() and _torch.permutation(slot) is None:
        return value
    with torch.no_grad():
        return torch.empty_strided(slot.shape, slot.stride(), dtype=value.dtype).copy_(value)


def _wrapper_subclass(t) -> bool:
    """Whether ``t`` is a torch tensor subclass made of inner tensors."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(t, torch.Tensor):
        return False
    from . import _torch

    return _torch.is_wrapper_subclass(t)


def _swap(swapped: dict, named: dict, name: str, slot, value) -> None:
    """Records ``value`` as the new value of the base's tensor subclass
    ``slot`` (named ``name``), checked: of its class, dtype and shape, and,
    for a tensor tied under several names, one value. It is sealed as the
    class seals it, its inner tensors each compared with the base's."""
    if type(value) is not type(slot):
        raise InvalidInputError(
            f"update: tensor {name!r} is a {type(slot).__module__}.{type(slot).__qualname__} in the base, not a "
            f"{type(value).__module__}.{type(value).__qualname__}: a state dict cannot change a tensor's class "
            "(quantize the new weights as the base's are, or pass the whole new pipeline instead)"
        )
    if value.dtype != slot.dtype or tuple(value.shape) != tuple(slot.shape):
        raise InvalidInputError(
            f"update: tensor {name!r} is {slot.dtype} {list(slot.shape)} in the base, "
            f"the new value {value.dtype} {list(value.shape)}"
        )
    prev = swapped.get(id(slot))
    if prev is not None and prev[0] is not value and not _same_inner(prev[0], value):
        raise InvalidInputError(
            f"update: {named[id(slot)]!r} and {name!r} are one tied tensor in the base, "
            "but the state dict gives them different values"
        )
    swapped[id(slot)] = (value, slot)
    named.setdefault(id(slot), name)


def _same_inner(a, b) -> bool:
    """Whether tensor subclasses ``a`` and ``b`` (one class) hold the same
    inner tensors, byte for byte, and context."""
    import torch

    from . import _torch

    (x, cx), (y, cy) = _torch.flatten(a), _torch.flatten(b)
    if x.keys() != y.keys() or cx != cy:
        return False
    return all(x[k].dtype == y[k].dtype and x[k].shape == y[k].shape and _same_bytes(torch, x[k], y[k]) for k in x)


def _write_through(slots: dict, out: dict, named: dict) -> tuple[dict, dict]:
    """``out`` (substitutes by ``id`` of the base's tensor) with each new
    value given to a tensor that shares memory with others of the base
    (tied weights that are two objects, as in every ``state_dict()`` of a
    tied model; a view kept as a buffer) written into that memory, as
    ``load_state_dict`` writes it (``copy_``): the memory's base tensor
    gets the values composed, and the others on it follow it, as views of
    it, so that every one of them shows the new values. Returns the
    substitutes and the followers (``{id(view): (base, offset)}``). Two new
    values for one memory that disagree are refused. Torch tensors only
    (numpy pipelines keep no views at sealing)."""
    torch = sys.modules.get("torch")
    if torch is None or not out:
        return out, {}
    from . import _torch, _torch_seal

    tensors = list({id(t): t for t in slots.values() if isinstance(t, torch.Tensor)}.values())
    found = _torch_seal.views(tensors)
    groups: dict = {}  # id(base) -> (base, [(view, offset)])
    for t in tensors:
        if id(t) in found:
            base, offset = found[id(t)]
            groups.setdefault(id(base), (base, []))[1].append((t, offset))
    names = {}  # id(tensor) -> its name (the one given, where one is)
    for n, t in slots.items():
        names.setdefault(id(t), n)
    names.update(named)
    follows: dict = {}
    for base_id, (base, members) in groups.items():
        given = [(t, off) for t, off in members if id(t) in out]
        if base_id not in out and not given:
            continue
        composed = _carrier(base, base_id, given, out)
        if composed is None:
            # The base's values, then each new value written where its tensor
            # lies in them, on a copy (neither the shared memory nor a value
            # given is written).
            with torch.no_grad():
                composed = _composed(torch, base, base_id, given, out, names)
        for t, off in members:
            out.pop(id(t), None)
            follows[id(t)] = (base, off)
        inp, alive = _torch.pack_input(composed, names[base_id])
        out[base_id] = (composed, inp, alive, base)
    return out, follows


def _carrier(base, base_id, given: list, out: dict):
    """A value given that already is the whole memory's new value, or
    ``None``: a contiguous CPU tensor of the base's shape, given to the base
    or to a view of all of it, in whose memory every other value given lies
    where its tensor lies in the base (a tied model's next state dict gives
    its tied pair so): sealed as it is, without composing a copy."""
    values = [out[id(t)][0] for t, _ in [(base, 0), *given] if id(t) in out]
    if any(v.is_conj() or v.is_neg() for v in values):
        return None  # a lazy conjugate is not the values of its memory
    candidates = [out[base_id][0]] if base_id in out else []
    candidates += [out[id(t)][0] for t, off in given if off == 0 and t.shape == base.shape]
    for c in candidates:
        if not (_is_its_memory(c) and c.shape == base.shape and c.stride() == base.stride()):
            continue
        size = c.element_size()
        if all(
            (v := out[id(t)][0]).is_cpu and v.data_ptr() == c.data_ptr() + off * size and v.stride() == t.stride()
            for t, off in [(base, 0), *given]
            if id(t) in out
        ):
            return c
    return None


def _is_its_memory(value) -> bool:
    """Whether torch tensor ``value`` is its memory's values, in order: on
    the CPU, contiguous, no lazy conjugate or negative view over it."""
    return value.is_cpu and value.is_contiguous() and not value.is_conj() and not value.is_neg()


def _composed(torch, base, base_id, given: list, out: dict, names: dict):
    """The base's memory with the new values written in: the base's new
    value (or its values), then each view's where it lies; refused where
    two of them disagree."""
    from ._torch import broadcast_shape, compact

    composed = torch.empty(base.shape, dtype=base.dtype)
    composed.copy_(out[base_id][0] if base_id in out else base)
    for t, off in given:
        region, value = composed.as_strided(t.shape, t.stride(), off), out[id(t)][0]
        if broadcast_shape(region) is not None:
            # A broadcast view (expand) holds each repeated value once: its
            # new value is written once (and must repeat as it does, below).
            region = compact(region)
            value = value[
                tuple(slice(None) if n == m else slice(0, 1) for n, m in zip(t.shape, region.shape, strict=True))
            ]
        region.copy_(value)
    for t, off in [(base, 0), *given]:
        if id(t) in out and not _same_bytes(torch, composed.as_strided(t.shape, t.stride(), off), out[id(t)][0]):
            if t is not base and broadcast_shape(t) is not None and sum(id(u) in out for u, _ in given) == 1:
                raise InvalidInputError(
                    f"update: {names[id(t)]!r} repeats its values along a dimension in the base (an expand of "
                    f"{names[id(base)]!r}); its new value must repeat the same way"
                )
            given_names = [names[id(u)] for u, _ in [(base, 0), *given] if id(u) in out]
            raise InvalidInputError(
                f"update: {', '.join(map(repr, given_names))} share memory in the base (tied, or views of one "
                "tensor), but the state dict gives them values that disagree"
            )
    return composed


def _same_bytes(torch, a, b) -> bool:
    """Whether tensors ``a`` and ``b`` (one dtype and shape) hold the same
    bytes: NaN equals itself here, and -0.0 is not 0.0, as in a checkpoint."""
    a, b = (x.detach().cpu().resolve_conj().resolve_neg().reshape(-1).contiguous() for x in (a, b))
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def pack_update(parts, opened: list, sealed, new, options: _load.LoadOptions) -> tuple[Packing, tuple]:
    """The delta of a new version over the version of ``parts`` (opened in
    this process: ``opened``) and ``sealed``: ``new`` is a pipeline, or a
    state dict (``{name: tensor}``) applied onto the base pipeline (loaded
    here zero-copy with ``options``). Returns its packing and the base parts
    it still refers to (in order)."""
    adapters = imported_adapters()
    base = _Base(opened, sealed)
    substitute: dict = {}
    follows: dict = {}
    swapped: dict = {}
    if isinstance(new, dict):
        # A state dict or a whole new pipeline: told apart by the base's
        # tensors' names (see _is_state_dict). The base pipeline's tensors
        # ARE the base buffers': unchanged ones match by address, without a
        # byte read.
        if sealed.sources is None:
            pipeline = _load.build(base.opened[0], sealed, options).pipeline
        else:
            pipeline = _load.build_parts(base.opened, parts, sealed, options).pipeline
        slots = _slots(pipeline, adapters)
        if _is_state_dict(new, pipeline, slots, adapters):
            substitute, follows, swapped = _substitutes(slots, new, adapters)
            new = pipeline
        del pipeline, slots
    sealer = _DeltaSealer(new, base, substitute, follows, swapped)
    skeleton = sealer.pickle(new)
    folded = _fold_sparse_parts(sealer, base)
    used = sorted({p for p, _ in sealer.sources if p != _NEW})
    number = {p: k for k, p in enumerate(used)}
    own = len(used)
    sources = tuple((own, j) if p == _NEW else (number[p], j) for p, j in sealer.sources)
    # Pickled: the base's opened buffers and pipeline are no longer needed
    # here; what the fill reads is in ``inputs`` and ``keep``.
    sealer.base = sealer.substitute = sealer.swapped = sealer.obj = None
    if not used and sources == tuple((0, j) for j in range(len(sources))):
        sources = None  # nothing in common with the base: one part, loaded as any wrapper
    _telemetry.log.info(
        "update: %d tensors, %d unchanged by identity, %d compared equal, %d stored in the delta (%d of them "
        "unchanged, from parts it uses little of), %d parts kept",
        len(sealer.sources),
        base.identical,
        base.compared,
        len(sealer.inputs),
        folded,
        own,
    )
    return packing_of(sealer, skeleton, "sealing update", sources), tuple(parts[p] for p in used)
