"""TIGER (Rajput et al., NeurIPS'23): semantic IDs (RQ-VAE) and a T5 trained from scratch to generate them."""
from recbole_dealrec.model.tiger.model import TIGER

__all__ = ["TIGER"]
