"""Entry points (``dfm train``, ``dfm sample``, ...) and DeepSpeed launch, installed as ``dfm.launch``."""
