"""ARRA data: raw-input readers, the offline indexed-dataset builder (and, later, the training datasets)."""
