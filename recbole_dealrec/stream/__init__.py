"""New data arrives: a dataset cut into periods, one round per period (see :mod:`recbole_dealrec.stream.runner`)."""
from recbole_dealrec.stream.runner import run_stream

__all__ = ["run_stream"]
