"""recbole-dealrec: DEALRec data pruning for LLM-based recommenders, as a RecBole plugin."""
from recbole_dealrec import compat as _compat

_compat.apply()  # before anything else touches RecBole

__version__ = "0.1.0"
