"""ARRA data: raw-input readers, the offline indexed-dataset builder (one process or many: build_ranks.py),
the dataset manifest (manifest.py), the training datasets (ARRADataset, blends, mock data) and the DALI
preprocessing pipeline."""
