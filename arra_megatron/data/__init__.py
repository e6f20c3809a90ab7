"""ARRA data: raw-input readers, the offline indexed-dataset builder (one process or many: build_ranks.py),
the training datasets (ARRADataset, blends, mock data) and the DALI preprocessing pipeline."""
