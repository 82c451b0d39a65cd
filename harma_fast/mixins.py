"""Classes made at run time: harma_fast's forward mixed in front of a model's own class.

Patching swaps ``module.__class__`` for ``Mixin + OriginalClass`` (and unpatching swaps it
back), so a patched model stays an instance of its own classes. Such a class has no name pickle
can look up, so it pickles as "mix ``mixin`` into ``original``": ``torch.save(model)``,
``copy.deepcopy`` and multiprocessing work, and the class is made again when loaded.
"""
from __future__ import annotations

import copyreg
from typing import Dict, Tuple

_CLASSES: Dict[Tuple[type, type, str], type] = {}


def mixed_class(cls: type, mixin: type, prefix: str = "") -> type:
    """``type(prefix + cls.__name__, (mixin, cls))``, one per ``(cls, mixin)``, picklable."""
    key = (cls, mixin, prefix)
    if key not in _CLASSES:
        _CLASSES[key] = type(prefix + cls.__name__, (mixin, cls),
                             {"_harma_original_class": cls, "_harma_mix": key, "__reduce_ex__": _reduce_mixed})
    return _CLASSES[key]


def _reduce_mixed(self, protocol):
    cls = type(self)
    reduced = super(cls, self).__reduce_ex__(protocol)
    if not isinstance(reduced, tuple) or reduced[0] is not copyreg.__newobj__ or reduced[1] != (cls,):
        raise TypeError(f"cannot pickle {cls.__name__} with pickle protocol {protocol}; use protocol 2 or newer")
    return (_new_mixed, cls._harma_mix, *reduced[2:])


def _new_mixed(cls: type, mixin: type, prefix: str):
    mixed = mixed_class(cls, mixin, prefix)
    return mixed.__new__(mixed)
