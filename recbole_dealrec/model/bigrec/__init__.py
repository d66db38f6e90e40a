"""BIGRec (Bao et al., 2023): an LLM + LoRA generating the next item's title, grounded to items."""
from recbole_dealrec.model.bigrec.model import BIGRec

__all__ = ["BIGRec"]
