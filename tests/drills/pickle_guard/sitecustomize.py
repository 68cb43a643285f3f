"""Loaded by every Python process of a drill (``PYTHONPATH``): records each unpickling.

``pickle.loads``, ``pickle.load`` and ``pickle.Unpickler`` (which ``torch.load`` uses when
``weights_only=False``) append one line (process, caller) to ``$FEDSEG_PICKLE_LOG``. The drills
assert that the ServerApp and ClientApp processes never wrote one. Recording, not refusing:
a refused call would change what the drill measures.
"""

import os
import pickle
import sys
import traceback

_LOG = os.environ.get("FEDSEG_PICKLE_LOG")


def _record(kind):
    if not _LOG:
        return
    stack = "".join(traceback.format_stack(limit=6)[:-2]).replace("\n", " | ")
    with open(_LOG, "a") as fh:
        fh.write(f"{os.getpid()} {os.path.basename(sys.argv[0])} {kind}: {stack}\n")


_loads, _load = pickle.loads, pickle.load


def loads(*args, **kwargs):
    _record("pickle.loads")
    return _loads(*args, **kwargs)


def load(*args, **kwargs):
    _record("pickle.load")
    return _load(*args, **kwargs)


class Unpickler(pickle.Unpickler):
    def __init__(self, *args, **kwargs):
        _record("pickle.Unpickler")
        super().__init__(*args, **kwargs)


if _LOG:
    pickle.loads, pickle.load, pickle.Unpickler = loads, load, Unpickler
