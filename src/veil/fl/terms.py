"""What a data owner accepts from the server in one SecAgg+ run, and why it refuses at most once.

Under SecAgg+ the server never sees an owner's reply, but it sees whether the owner answered, refused
or stayed silent (and when), and it chooses what it sends each owner in every round. A value that
decides between answering and refusing as a function of the owner's rows is then a one-bit oracle per
round: with a fit-config max_weight chosen per owner and per round, seven rounds of binary search gave
a curious server every owner's exact row count. So an owner

1. takes every bound it checks its rows against from the run's public configuration (`FLConfig`, the
   Flower run config both apps read, fixed for the run), or fixes it at its first use and refuses any
   change;
2. answers each kind of message at most as often as the protocol sends it (`STAGE_BUDGET`, `rounds`);
3. leaves the run at its first refusal, whatever caused it: it answers no later message of that run
   that involves its rows (`LEFT`; it still takes part in SecAgg+'s key exchange, which involves none:
   Flower's SecAgg+ workflow cannot finish a round in which a sampled owner fails before the masked
   vectors).

No bound an owner checks its row count against is the server's choice: the row bound is the run
config's, a weight above SecAgg+'s max_weight is clipped (`weight_clip_mod`), not refused, and the
count unit is held to that max_weight, not to the rows. What refusals tell the server is then at most
at which masked-vector message each owner left, and which of veil's fixed reasons it gave (four can
depend on its data: more rows than the run config's row bound, a non-finite reply, a reply beyond
SecAgg+'s range around the server's references or parameters, and `OTHER_FAILURE` for any error
outside veil's checks, whose own text stays in the owner's log): one of 1 + 4 M outcomes for the
M <= 9 + `rounds` such messages of a run, at most log2(1 + 4 M) bits per owner and run (6.6 with the
default 15 rounds), none of them about its row count but the one bit against the public row bound
(and, with DP statistics, whose stage 2 is unweighted, whether n_i < c / 64 for the c of the owner's
one stage-2 round). A server that starts several runs learns this much in each.

Everything the server sends that the owner's behaviour depends on, and how it is held
(`run_terms_mod` checks it before the owner touches its rows):

- SecAgg+ setup, number of shares, reconstruction threshold, quantization range, modulus and clipping
  range: equal to `rounds.secagg_terms` for the round's kind (statistics or training), else refused.
- SecAgg+ setup, max_weight: the bound on the owner's weight inside the masked vector (`weight_clip_mod`
  weighs a larger count at the bound). 1 in unweighted rounds; in row-weighted rounds the value of the
  first such round, a different one later refused (whatever the rows). The first value is the server's
  choice per owner: it scales that owner's share of the sums (see "Not held").
- the row bound B of the count entries: `secagg_max_rows` of the run config, never a message; an owner
  above it refuses its first masked-vector message (`OwnerClient`). One bit, against a public value.
- statistics stage (`veil-stage`): stages 0, 1 and 2 once per run, stage 3 at most `MAX_PASSES - 2` times.
- count unit c (stage 2): a power of two >= 1, and, weighed by rows, at most `COUNT_UNIT_LIMIT` times
  the run's max_weight (c / n_i then travels as c / max_weight); else refused, whatever the rows.
  Unweighted (DP statistics) it is refused when c / n_i leaves SecAgg+'s range (n_i < c / 64); stage 2
  comes once: one bit.
- references r (stage 2), m and s (stage 3): well-formed or refused (`preprocessing.owner_stats`); a
  statistic beyond SecAgg+'s range is refused. They change legitimately between refinement rounds:
  bounded by the stage budget and the exit rule.
- min-max histogram: the run config's `scaling`, never a message.
- parameters of a statistics round: zeros, as the statistics strategy sends (client-side DP clipping
  measures the reply against them and fails on a zero difference: with other parameters, an equality test).
- training parameters: where local training starts; an update that is non-finite or beyond
  `secagg_clip` is refused. They change every round: at most `rounds` training rounds per run.
- federated scaler (`veil-scaler`) and total row count (`veil-total`, the penalty's C N / n_i): fixed by
  the first training round, a change refused.
- `proximal_mu` (FedProx) and `clipping_norm` (client-side DP): the run config's, else refused.
- `server_round`: seeds local shuffling, so it acts through the update only (training budget).
- unmask stage, the owners whose secrets the owner's shares reveal: the survivors and the dropouts must
  be disjoint with the owner among the survivors, else refused. Listed in both, an owner would hand
  the server both its mask seed and its key, i.e. its vector; with a threshold above half the shares
  (`FLConfig`) no split of the owners into two groups told different lists reveals both either.

Not held: timing (how long an owner takes grows with its rows and depends on them; a refusal before
local training comes back sooner than an answer; replies are not padded), and which other owners take
part in a round (SecAgg+'s keys are not authenticated, so owners cannot check it): a server that leaves
an owner out of one round reads that owner's weight from the difference of two totals, and values it
may choose per owner within these terms (the first max_weight, references, parameters) scale that
owner's share of a sum the same way (a max_weight of its own per owner puts each weight at its own
place in the sum of weights, at most once per run since it is then fixed). On the
deployment engine the run config reaches each SuperNode through the SuperLink, once per run: a server
could give owners different ones, which changes nothing above (each is still fixed for the run).
"""

from __future__ import annotations

import logging
import math
import traceback
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MessageType
from flwr.common import FitIns, parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat

from veil.errors import FederationError, VeilError
from veil.fl import preprocessing as prep
from veil.fl.config import FLConfig
from veil.fl.rounds import secagg_terms

log = logging.getLogger("veil.fl")

TERMS_RECORD = "veil-terms"
LEFT = ("this owner left the run at an earlier refusal: under SecAgg+ an owner refuses at most once per run "
        "and then sends nothing that involves its rows")
OTHER_FAILURE = "this owner refused: an error outside veil's checks (its text stays in the owner's log)"
KEY_EXCHANGE = (Stage.SETUP, Stage.SHARE_KEYS)  # SecAgg+ stages that involve no data, answered even after leaving
STAGE_BUDGET = {0: 1, 1: 1, 2: 1, 3: prep.MAX_PASSES - 2}
"""How many masked-vector messages of each statistics stage an owner answers in one run (the
ServerApp's statistics loop runs at most `MAX_PASSES` rounds: stages 1 and 2, then refinements)."""
SETUP_KEYS = {Key.SHARE_NUMBER: "num_shares", Key.THRESHOLD: "reconstruction_threshold",
              Key.CLIPPING_RANGE: "clipping_range", Key.TARGET_RANGE: "quantization_range",
              Key.MOD_RANGE: "modulus_range", Key.MAX_WEIGHT: "max_weight"}
COUNT_UNIT_LIMIT = prep.STATS_CLIPPING_RANGE / 2
"""The largest count unit c / max_weight an owner accepts in a row-weighted stage 2: c / n_i travels
weighted, as c / max_weight, and half SecAgg+'s range leaves room for its rounding of the weight (an
honest server's c is about N / K, its max_weight above N)."""
CLIPPING_NORM = "clipping_norm"  # the key Flower's client-side DP wrapper puts in the fit config


class RunTerms:
    """The public terms one owner has seen in this run, in its Flower context's state (which lasts for
    the run on every engine, as SecAgg+'s own protocol state does)."""

    def __init__(self, context: Context) -> None:
        records = context.state.config_records
        if TERMS_RECORD not in records:
            records[TERMS_RECORD] = ConfigRecord({"left": False, "training": 0, "max-weight": 0.0,
                                                  **{f"stage-{stage}": 0 for stage in STAGE_BUDGET}})
        self.record = records[TERMS_RECORD]

    @property
    def left(self) -> bool:
        """Whether the owner has refused a message of this run (and so answers nothing more)."""
        return bool(self.record["left"])

    def leave(self) -> None:
        self.record["left"] = True

    @property
    def round_max_weight(self) -> float:
        """The current SecAgg+ round's max_weight (checked against the run's terms by `check`)."""
        return float(self.record.get(f"setup-{Key.MAX_WEIGHT}", 0.0))

    def check(self, msg: Message, cfg: FLConfig) -> None:
        """Refuse (`FederationError`) a SecAgg+ message outside the run's terms, before the owner's rows
        are touched; record what the terms fix at first use."""
        stage = secagg_stage(msg)
        if stage is None:
            return  # not a SecAgg+ message: refused by `masked_only_mod` or `secaggplus_mod`
        configs = msg.content.config_records[RECORD_KEY_CONFIGS]
        if stage == Stage.SETUP:
            for key in SETUP_KEYS:
                if key in configs:
                    self.record[f"setup-{key}"] = configs[key]
                else:
                    self.record.pop(f"setup-{key}", None)
        elif stage == Stage.COLLECT_MASKED_VECTORS:
            self._admit(compat.recorddict_to_fitins(msg.content, keep_input=True), cfg)
        elif stage == Stage.UNMASK:
            active, dead = set(configs.get(Key.ACTIVE_NODE_ID_LIST, [])), set(configs.get(Key.DEAD_NODE_ID_LIST, []))
            me = msg.metadata.dst_node_id
            if active & dead or me not in active:
                raise FederationError("the unmask stage lists an owner both as answered and as dropped, or not "
                                      "this owner among those that answered")

    def _admit(self, fitins: FitIns, cfg: FLConfig) -> None:
        config = fitins.config
        stage = int(config["veil-stage"]) if config.get("veil-task") == "stats" else None
        counter = "training" if stage is None else f"stage-{stage}"
        budget = cfg.rounds if stage is None else STAGE_BUDGET.get(stage, 0)
        if int(self.record.get(counter, 0)) >= budget:
            what = "training rounds" if stage is None else f"statistics stage-{stage} rounds"
            raise FederationError(f"more {what} than a run of this configuration has")
        self.record[counter] = int(self.record.get(counter, 0)) + 1
        pinned = float(self.record["max-weight"])
        received = self.record.get(f"setup-{Key.MAX_WEIGHT}")
        if cfg.row_weighted(stage) and not pinned and isinstance(received, float) and 1 <= received < np.inf:
            pinned = self.record["max-weight"] = received  # the first row-weighted round fixes it for the run
        expected = secagg_terms(cfg, stage, pinned)
        for key, name in SETUP_KEYS.items():
            if self.record.get(f"setup-{key}") != expected[name]:
                raise FederationError(f"the SecAgg+ {name} of this round is not the run's")
        if config.get(CLIPPING_NORM) != cfg.owner_clipping(stage):
            raise FederationError("the fit config's clipping norm is not the run's")
        mu = cfg.proximal_mu if stage is None and cfg.strategy.lower() == "fedprox" else None
        if config.get("proximal_mu") != mu:
            raise FederationError("the fit config's proximal_mu is not the run's")
        if stage is not None:
            if any(np.any(a != 0) for a in parameters_to_ndarrays(fitins.parameters)):
                raise FederationError("a statistics round starts from zeros")
            unit = float(config.get("veil-count-unit", 1.0))
            if stage == 2 and cfg.row_weighted(stage) and unit > COUNT_UNIT_LIMIT * pinned:
                raise FederationError("the count unit is too large for the run's max_weight")
            return
        scaler, total = bytes(config.get("veil-scaler", b"")), int(config.get("veil-total", 0))
        if "scaler" not in self.record:  # the first training round fixes them for the run
            self.record["scaler"], self.record["total"] = scaler, total
        elif self.record["scaler"] != scaler or self.record["total"] != total:
            raise FederationError("the federated scaler or row total differs from the run's first training round")


def secagg_stage(msg: Message) -> str | None:
    """The SecAgg+ stage a message asks for, or None for a message outside the protocol."""
    if msg.metadata.message_type != MessageType.TRAIN or not msg.has_content():
        return None
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    return None if configs is None else configs.get(Key.STAGE)


def _refusal(msg: Message, exc: BaseException) -> Message:
    """The error reply the server gets: veil's own refusals are fixed texts; any other error's text could
    carry the owner's data (a value in a library's message), so it stays in the owner's log."""
    if not isinstance(exc, VeilError):
        exc = FederationError(OTHER_FAILURE)
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"),
                   reply_to=msg)


def run_terms_mod(msg: Message, ctx: Context, call_next: Any, cfg: FLConfig) -> Message:
    """Outermost under SecAgg+: once the owner has refused a message of this run, refuse every later one
    but SecAgg+'s key exchange (`LEFT`); check each message against the run's terms (`RunTerms.check`)
    before the owner runs; turn any failure of the owner's chain into a refusal that ends its part.

    The refusal is returned as an error reply, not raised, so that the owner's context (which records
    that it left) is kept by every engine."""
    terms = RunTerms(ctx)
    if terms.left and secagg_stage(msg) not in KEY_EXCHANGE:
        return _refusal(msg, FederationError(LEFT))
    try:
        terms.check(msg, cfg)
        reply = call_next(msg, ctx)
    except Exception as exc:  # any refusal, whatever raised it, is the owner's last answer in this run
        terms.leave()
        log.warning("node %s refused and leaves the run:\n%s", msg.metadata.dst_node_id, traceback.format_exc())
        return _refusal(msg, exc)
    if reply.has_error():
        terms.leave()
    return reply


def weight_clip_mod(msg: Message, ctx: Context, call_next: Any) -> Message:
    """Inside `secaggplus_mod`: weigh the reply (its `num_examples`) at most the round's SecAgg+ max_weight.
    SecAgg+ would take a larger weight as a ratio above 1 (only logged, and its quantized factor can
    overflow the sum). Clipped, not refused: the bound's first value is the server's choice per owner,
    so a refusal would answer "more rows than x" for an x of its choosing. An honest server's bound is
    above the rows of every owner that took part in the count; the clip stays in the owner's log."""
    reply = call_next(msg, ctx)
    if msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
        return reply
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    bound = math.floor(RunTerms(ctx).round_max_weight)
    if fitres.num_examples > bound:
        log.warning("node %s holds more rows than the round's SecAgg+ max_weight: weighed at the bound",
                    msg.metadata.dst_node_id)
        fitres.num_examples = bound
        reply.content = compat.fitres_to_recorddict(fitres, keep_input=True)
    return reply
