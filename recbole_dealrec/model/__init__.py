"""The plugin's RecBole models; importing this package registers them in ``recbole_dealrec.utils.MODELS``."""
