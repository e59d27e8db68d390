"""Federated learning with Flower: data owners train `veil.ml` (scikit-learn) or PyTorch models
together, optionally with SecAgg+ and differential privacy, and the result serves encrypted predictions.

Features are standardized with federated statistics first (`veil.fl.preprocessing`: what the server
learns for each option is stated there), and the exported model folds the scaler into its weights.

    from veil import fl
    result = fl.run_simulation(fl.FLConfig(clients=10, secagg=True))
    model = fl.to_veil_model(result, X_calibration)   # compiled veil.ml model, takes raw features

Modules, by concern: `config` (`FLConfig`, the public `Task`, `FLResult`); `clientapp` (the owners'
`OwnerClient` and `ClientApp`, with `owner_factory` as the seam for other owner behaviour);
`serverapp` (the `ServerApp`: statistics, then training rounds); `statistics_rounds` (the server side
of `preprocessing`); `rounds` (a round's bounded wait and SecAgg+ fit workflow); `checkpoint` (result,
progress and checkpoint files); `strategies`, `learners`, `privacy`, `partition`, `data`; the engines
`simulation` (Ray, or the in-process grid of `inprocess`) and `deployment` (SuperLink and SuperNodes,
loading the apps of `app`); `export` (to `veil.ml` and `veil serve`); `cli` (`veil fl`).
"""

from typing import Any

_EXPORTS = {
    "FLConfig": "veil.fl.config", "FLResult": "veil.fl.config", "Task": "veil.fl.config",
    "make_client_app": "veil.fl.clientapp", "OwnerClient": "veil.fl.clientapp",
    "make_server_app": "veil.fl.serverapp",
    "load_result": "veil.fl.checkpoint", "save_result": "veil.fl.checkpoint", "load_checkpoint": "veil.fl.checkpoint",
    "run_simulation": "veil.fl.simulation", "FederationError": "veil.fl.simulation",
    "run_deployment": "veil.fl.deployment", "LocalFederation": "veil.fl.deployment",
    "iid_partition": "veil.fl.partition", "dirichlet_partition": "veil.fl.partition", "partition": "veil.fl.partition",
    "load_dataset": "veil.fl.data", "SklearnLearner": "veil.fl.learners", "TorchLearner": "veil.fl.learners",
    "make_learner": "veil.fl.learners", "build_strategy": "veil.fl.strategies", "check_update": "veil.fl.strategies",
    "gaussian_epsilon": "veil.fl.privacy", "privacy_report": "veil.fl.privacy", "PrivacyReport": "veil.fl.privacy",
    "to_veil_model": "veil.fl.export", "deploy": "veil.fl.export", "encrypted_check": "veil.fl.export",
    "FederatedScaler": "veil.fl.preprocessing", "InProcessGrid": "veil.fl.inprocess",
    "FederatedConfigError": "veil.errors", "FederatedStatisticsError": "veil.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import on first use: Flower and Ray are heavy and the CLI parser must stay fast."""
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'veil.fl' has no attribute {name!r}")
