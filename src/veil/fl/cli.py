"""`veil fl run|superlink|supernode`: federated training with a progress display of rounds and accuracy."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from veil.errors import VeilError
from veil.fl.names import FL_MODELS, STRATEGIES


def _progress(rounds: int, quiet: bool) -> tuple[Any, Any]:
    from tqdm import tqdm

    bar = tqdm(total=rounds, desc="rounds", unit="round", disable=quiet, file=sys.stderr)

    def on_round(row: dict) -> None:
        metric = {k: f"{v:.4f}" for k, v in row.items() if k in ("accuracy", "r2", "loss")}
        bar.set_postfix(metric)
        if row["round"] > 0:
            bar.update(1)

    return bar, on_round


def _config(args: argparse.Namespace) -> Any:
    from veil.fl.checkpoint import CHECKPOINT_DIR, load_checkpoint
    from veil.fl.config import FLConfig

    checkpoint = str((Path(args.out) / CHECKPOINT_DIR).resolve())
    if args.resume:
        # the interrupted run's settings; only the number of rounds may grow
        saved = load_checkpoint(Path(args.resume)).config
        rounds = args.rounds if args.rounds is not None else saved.rounds
        return FLConfig(**{**saved.__dict__, "rounds": rounds, "resume": str(Path(args.resume).resolve()),
                           "checkpoint_dir": checkpoint, "out_dir": ""})
    return FLConfig(dataset=args.dataset, model=args.model, clients=args.clients,
                    rounds=15 if args.rounds is None else args.rounds,
                    strategy=args.strategy, partition=args.partition, alpha=args.alpha, seed=args.seed,
                    max_iter=args.max_iter, epochs=args.epochs, lr=args.lr, secagg=args.secagg,
                    secagg_max_rows=args.secagg_max_rows,
                    dp=args.dp, noise_multiplier=args.noise_multiplier, clipping_norm=args.clipping_norm,
                    delta=args.delta, proximal_mu=args.proximal_mu,
                    scaling="off" if args.no_standardize else args.scaling, stats_noise=args.stats_noise,
                    stats_clip=args.stats_clip, fraction_fit=args.fraction_fit,
                    min_clients=args.min_clients if args.min_clients is not None else min(2, args.clients),
                    round_timeout=args.round_timeout, checkpoint_dir=checkpoint)


def _deploy_token(args: argparse.Namespace) -> str:
    token = args.token or os.environ.get("VEIL_TOKEN", "")
    if not token:
        raise VeilError("--deploy needs an admin token: --token or VEIL_TOKEN")
    return token


def _check_deploy_target(args: argparse.Namespace) -> None:
    """Before training: the --deploy server answers over TLS and knows the token, else VeilError
    (a missing --ca for a private CA would otherwise surface as a traceback after the whole run)."""
    import httpx

    from veil.serve.client import Client

    try:
        with Client(args.deploy, _deploy_token(args), verify=args.ca or True, retries=0) as client:
            client.models()
    except httpx.TransportError as exc:
        raise VeilError(f"--deploy {args.deploy}: cannot reach it ({type(exc).__name__}: {exc}); "
                        "a server certificate from a private CA needs --ca CA.pem") from None


def _run(args: argparse.Namespace) -> int:
    import logging

    from veil.fl.config import FLResult
    from veil.fl.data import load_dataset

    logging.getLogger("flwr").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    cfg = _config(args)
    if args.deploy:
        _check_deploy_target(args)
    out = Path(args.out)
    bar, on_round = _progress(cfg.rounds, args.quiet)
    with tempfile.TemporaryDirectory(prefix="veil-fl-") as tmp:
        try:
            if args.engine == "simulation":
                from veil.fl.simulation import run_simulation

                result: FLResult = run_simulation(cfg, on_round=on_round, workdir=tmp, engine=args.simulator)
            elif args.superlink:
                result = _submit_existing(args, cfg, out, on_round)
            else:
                from veil.fl.deployment import run_deployment

                result = run_deployment(cfg, Path(tmp), tls=args.tls, timeout=args.timeout, on_round=on_round)
        finally:
            bar.close()
    data = load_dataset(cfg.dataset, seed=cfg.seed)
    summary = _finish(result, data, out, args)
    print(json.dumps(summary, indent=2) if args.json else _table(summary))
    return 0


def _submit_existing(args: argparse.Namespace, cfg: Any, out: Path, on_round: Any) -> Any:
    """Submit to a SuperLink started elsewhere (`veil fl superlink`) and follow its progress file."""
    from veil.fl.deployment import submit_run, wait_for_result

    run_dir = (out / "run").resolve()
    for stale in ("progress.jsonl", "result.json"):
        (run_dir / stale).unlink(missing_ok=True)
    cfg.out_dir = str(run_dir)
    submit_run(args.superlink, cfg, out / "flwr", args.root_certificates)
    return wait_for_result(run_dir, cfg.rounds, args.timeout, on_round)


def _finish(result: Any, data: Any, out: Path, args: argparse.Namespace) -> dict:
    """Save the global model (as `veil.ml`: linear, or a polynomial network for torch-mlp), optionally
    deploy it, summarise."""
    from veil.fl.checkpoint import save_result

    summary: dict[str, Any] = {"history": result.history, "rejected": len(result.rejected),
                               "privacy": None if result.privacy is None else result.privacy.to_dict(),
                               "wall_time": round(result.wall_time, 2), "out": str(out),
                               "scaling": None if result.scaler is None else result.scaler.kind,
                               "statistics": result.statistics}
    try:
        from veil.fl.export import encrypted_check, to_veil_model

        model = to_veil_model(result, data.X_test)
    except TypeError as exc:
        summary["veil_model"] = f"not exported: {exc}"
        save_result(result, out)
        return summary
    # the exported model (scaler folded in) on raw features, encrypted, against the plaintext federated model
    result.export = encrypted_check(result, model, data.X_test,
                                    data.y_test if data.task == "classification" else None)
    summary.update(result.export)
    save_result(result, out)
    model.save(out / "model")
    summary["veil_model"] = str(out / "model")
    if args.deploy:
        from veil.fl.export import deploy
        from veil.serve.client import Client

        token = _deploy_token(args)
        verify: bool | str = args.ca or True
        summary["deployed"] = deploy(out / "model", args.deploy, token, args.name, verify=verify)
        with Client(args.deploy, token, verify=verify) as client:
            encrypted = client.predict(data.X_test, model=args.name)
        plain = model.predict(data.X_test)
        summary["served_agreement"] = float(np.mean(encrypted == plain))
        if data.task == "classification":
            summary["served_accuracy"] = float(np.mean(encrypted == data.y_test))
    return summary


def _table(summary: dict) -> str:
    lines = ["round  metric    loss"]
    for row in summary["history"]:
        metric = row.get("accuracy", row.get("r2", float("nan")))
        lines.append(f"{row['round']:>5}  {metric:.4f}  {row['loss']:.4f}")
    lines.append(f"dropped updates: {summary['rejected']}   wall time: {summary['wall_time']} s")
    stats = summary.get("statistics")
    if stats:
        lines.append(f"federated {summary['scaling']} scaling: {stats['n_samples']} rows, {stats['rounds']} statistics "
                     f"rounds in {stats['wall_time']:.2f} s{' (SecAgg+)' if stats['secagg'] else ''}")
    if summary["privacy"]:
        p = summary["privacy"]
        lines.append(f"DP ({p['mode']} clipping): noise multiplier {p['noise_multiplier']}, clipping norm "
                     f"{p['clipping_norm']}, noise std {p['noise_std']:.4g}: ({p['epsilon']:.3g}, {p['delta']:g})-DP "
                     f"per data owner over {p['rounds']} rounds")
    lines.append(f"model: {summary['veil_model']}")
    for key in ("encrypted_accuracy", "plaintext_accuracy", "encrypted_agreement", "served_accuracy",
                "served_agreement"):
        if key in summary:
            lines.append(f"{key.replace('_', ' ')}: {summary[key]:.4f}")
    return "\n".join(lines)


def _flower_env(home: str | None) -> dict[str, str]:
    from veil.fl.simulation import offline_env

    env = {**os.environ, **offline_env(home)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _superlink(args: argparse.Namespace) -> int:
    """Run a SuperLink in the foreground (Ctrl-C stops it)."""
    cmd = ["flower-superlink", "--host", args.host, "--port", str(args.port),
           "--disable-runtime-dependency-installation"]
    if args.ssl_certfile:
        cmd += ["--ssl-certfile", args.ssl_certfile, "--ssl-keyfile", args.ssl_keyfile]
        if args.ssl_ca_certfile:
            cmd += ["--ssl-ca-certfile", args.ssl_ca_certfile]
    else:
        cmd.append("--insecure")
    return subprocess.call(cmd, env=_flower_env(args.home))


def _supernode(args: argparse.Namespace) -> int:
    """Run one data owner's SuperNode in the foreground."""
    from veil.net import free_port

    cmd = ["flower-supernode", "--superlink", args.superlink, "--port", str(args.port or free_port()),
           "--node-config", f"partition-id={args.partition_id} num-partitions={args.clients}"]
    cmd += ["--root-certificates", args.root_certificates] if args.root_certificates else ["--insecure"]
    return subprocess.call(cmd, env=_flower_env(args.home))


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `fl` with subcommands `run`, `superlink` and `supernode` on an argparse subparsers object."""
    fl = subparsers.add_parser("fl", help="federated learning with Flower (SecAgg+, DP, encrypted deployment)")
    sub = fl.add_subparsers(dest="fl_command", required=True)

    run = sub.add_parser("run", help="train a model federatedly and save it as a veil.ml model")
    run.add_argument("--clients", type=int, default=10)
    run.add_argument("--rounds", type=int, default=None, help="training rounds (default 15)")
    run.add_argument("--model", choices=FL_MODELS, default="logreg",
                     help="torch-mlp trains Linear-polynomial-Linear (ReLU's quadratic fit as the activation "
                          "from the start), so the exported encrypted network is exactly the trained one")
    run.add_argument("--dataset", default="digits", help="digits, iris, wine, breast_cancer, diabetes or a .npz")
    run.add_argument("--strategy", choices=STRATEGIES, default="fedavg")
    run.add_argument("--partition", choices=("iid", "dirichlet"), default="iid")
    run.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (label skew)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--max-iter", type=int, default=1,
                     help="local solver iterations per round (scikit-learn; 1 converges to central under skew)")
    run.add_argument("--epochs", type=int, default=10, help="local epochs per round (torch)")
    run.add_argument("--lr", type=float, default=0.3, help="local learning rate (torch)")
    run.add_argument("--proximal-mu", type=float, default=0.1, help="FedProx proximal term (torch)")
    run.add_argument("--secagg", action="store_true", help="aggregate with SecAgg+ (server sees only the sum)")
    run.add_argument("--secagg-max-rows", type=int, default=100_000,
                     help="SecAgg+: public bound on one owner's rows (an owner with more leaves the run visibly)")
    run.add_argument("--dp", choices=("off", "server", "client"), default="off",
                     help="Gaussian DP with server-side or client-side fixed clipping")
    run.add_argument("--noise-multiplier", type=float, default=1.0)
    run.add_argument("--clipping-norm", type=float, default=1.0)
    run.add_argument("--delta", type=float, default=1e-5)
    run.add_argument("--no-standardize", action="store_true",
                     help="train on raw features (default: federated scaling from securely aggregated statistics)")
    run.add_argument("--scaling", choices=("standard", "minmax"), default="standard",
                     help="federated scaler: mean/std, or min/max from an aggregate histogram")
    run.add_argument("--stats-noise", type=float, default=0.0,
                     help="Gaussian DP noise multiplier on the statistics rounds (0: none)")
    run.add_argument("--stats-clip", type=float, default=1.0, help="L2 clipping norm of each owner's statistics")
    run.add_argument("--fraction-fit", type=float, default=1.0, help="fraction of owners sampled per round")
    run.add_argument("--min-clients", type=int, default=None,
                     help="stop with an error when fewer valid updates than this remain in a round (default 2)")
    run.add_argument("--round-timeout", type=float, default=0.0,
                     help="seconds to wait for owners each round; late owners are dropped (0: wait)")
    run.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR (its --out) after its last round")
    run.add_argument("--engine", choices=("simulation", "deployment"), default="simulation")
    run.add_argument("--simulator", choices=("ray", "inprocess"), default="ray",
                     help="simulation: Flower's Ray engine or veil's in-process grid (no Ray start-up)")
    run.add_argument("--superlink", help="deployment: submit to this running SuperLink instead of starting one")
    run.add_argument("--root-certificates", help="deployment: CA of a TLS SuperLink given with --superlink")
    run.add_argument("--tls", action="store_true", help="deployment: TLS between SuperLink and SuperNodes")
    run.add_argument("--timeout", type=float, default=1800.0, help="deployment: seconds to wait for the run")
    run.add_argument("--out", default="fl-model", help="output directory (result, weights, veil.ml model)")
    run.add_argument("--deploy", metavar="URL", help="deploy the compiled model to this veil server")
    run.add_argument("--token", help="admin token for --deploy (default: $VEIL_TOKEN)")
    run.add_argument("--name", default="fl-model", help="model name on the server")
    run.add_argument("--ca", help="CA bundle to verify the veil server")
    run.add_argument("--json", action="store_true", help="print the summary as JSON")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--verbose", action="store_true", help="show Flower's own log")
    run.set_defaults(func=_run)

    link = sub.add_parser("superlink", help="run a Flower SuperLink (deployment engine)")
    link.add_argument("--host", default="127.0.0.1")
    link.add_argument("--port", type=int, default=9093)
    link.add_argument("--ssl-certfile")
    link.add_argument("--ssl-keyfile")
    link.add_argument("--ssl-ca-certfile")
    link.add_argument("--home", help="directory for Flower's state (FLWR_HOME)")
    link.set_defaults(func=_superlink)

    node = sub.add_parser("supernode", help="run one data owner's Flower SuperNode")
    node.add_argument("--superlink", default="127.0.0.1:9093")
    node.add_argument("--partition-id", type=int, required=True)
    node.add_argument("--clients", type=int, required=True, help="number of data owners (partitions)")
    node.add_argument("--port", type=int, default=0, help="local Runtime API port (default: a free one)")
    node.add_argument("--root-certificates", help="CA certificate of a TLS SuperLink")
    node.add_argument("--home", help="directory for Flower's state (FLWR_HOME)")
    node.set_defaults(func=_supernode)
    return fl


def main(argv: list[str] | None = None) -> int:
    """`python -m veil.fl ...` without the top-level `veil` command."""
    parser = argparse.ArgumentParser(prog="veil")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["fl", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except (VeilError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
