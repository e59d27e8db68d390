"""Names of the models a federation trains (`make_learner`) and of its strategies (`build_strategy`);
import-free so that the CLI parser stays fast. `veil bench` measures a different set of its own
(`veil.bench.BENCH_MODELS`)."""

FL_MODELS = ("logreg", "sgd", "linreg", "ridge", "sgdreg", "torch-linear", "torch-mlp")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedtrimmedavg", "fedmedian", "krum")
