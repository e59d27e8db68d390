"""Names accepted for models and strategies (kept import-free so the CLI parser stays fast)."""

MODELS = ("logreg", "sgd", "linreg", "ridge", "sgdreg", "torch-linear", "torch-mlp")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedtrimmedavg", "fedmedian", "krum")
