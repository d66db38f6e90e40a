"""The plugin's RecBole models; importing this package registers them in ``recbole_dealrec.utils.MODELS``."""
import recbole_dealrec.model.bigrec  # noqa: F401,E402  (registers BIGRec)
