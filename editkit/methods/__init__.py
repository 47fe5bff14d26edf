"""Built-in editing methods, one folder each (hyperparameters beside the algorithm)."""
