"""Run the Rucio daemons that move rules to OK, in one process, pass after pass.

    RUCIO_CONFIG=WORKDIR/etc/rucio.cfg python daemons.py --status WORKDIR/daemons.json

Each pass calls, in order, the daemon functions of rucio 41.5.1 once, with
``partition_wait_time=0`` (their command lines' ``--run-once`` first sleeps a hard-coded 10 s
waiting for other workers, useless with one worker):

1. judge-evaluator: locks and transfer requests for files attached after a rule;
2. judge-repairer: STUCK rules whose ``updated_at`` is older than ``[repairer] updated_at_delta``
   (30 min by default, as in production; `RucioCatalog.repair` backdates a rule with
   ``boost_rule`` so the next pass picks it up), *plus*, as soon as their source has a file they
   wait for, the STUCK rules that only wait for a chained source (``MissingSourceReplica``: a rule
   with a source expression created before its source had the file) -- see below;
3. conveyor-submitter with our ``local`` transfertool (`local_transfertool`): QUEUED -> SUBMITTED;
4. conveyor-poller (``older_than=0``): SUBMITTED -> DONE/FAILED from the copies' outcomes;
5. conveyor-finisher: replicas AVAILABLE, locks and rules OK; FAILED requests are retried (Rucio
   hard-codes 3 retries) and then the lock is STUCK with the transfer's error on the rule.

Why the extra repairer pass: Rucio never re-examines a rule that went STUCK because its source
replica did not exist yet until the repairer's delta has passed (30 min); a hub -> FrDF -> UKDF
chain would then wait half an hour at each hop. The repair itself is Rucio's own ``repair_rule``.

After each pass the runner writes ``{"loop": N, ...}`` to the status file, so tests can wait for
"two complete passes without any change" instead of sleeping. When there is no work (no request,
no re-evaluation, no STUCK rule due) it idles ``--idle`` seconds between passes.

This runs in the Rucio server environment (``.venv-rucio``), never in the project's.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from local_transfertool import NAME as TRANSFERTOOL  # noqa: E402
from local_transfertool import register  # noqa: E402

_LOG = logging.getLogger("drp-rucio-daemons")


def _write_status(path: Path, status: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(status))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Run daemon passes until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--status", type=Path, required=True, help="status file to write")
    parser.add_argument("--idle", type=float, default=1.0, help="seconds between idle passes")
    parser.add_argument("--log-level", default=os.environ.get("DRP_RUCIO_LOG_LEVEL", "WARNING"))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    if "RUCIO_CONFIG" not in os.environ:
        parser.error("RUCIO_CONFIG must name the server's rucio.cfg")

    # Module-level configuration reads happen at import: register first, import after.
    register()
    from rucio.common.config import config_get_int
    from rucio.core.rse_expression_parser import parse_expression
    from rucio.core.rule import repair_rule
    from rucio.daemons.common import run_daemon
    from rucio.daemons.conveyor import finisher, poller, submitter
    from rucio.daemons.judge import evaluator, repairer
    from rucio.db.sqla import models
    from rucio.db.sqla.constants import LockState, ReplicaState, RuleState
    from rucio.db.sqla.session import read_session
    from sqlalchemy import and_, func, or_, select

    delta = config_get_int("repairer", "updated_at_delta", default=1800)
    stop = threading.Event()

    def _stop(signum: int, frame: object) -> None:
        stop.set()
        # The daemons' own loops watch their graceful_stop events.
        for module in (submitter, poller, finisher):
            module.GRACEFUL_STOP.set()
        evaluator.graceful_stop.set()
        repairer.graceful_stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    paused_dids: dict[Any, Any] = {}
    paused_rules: dict[Any, Any] = {}

    def judge_evaluator() -> None:
        run_daemon(
            once=True, graceful_stop=evaluator.graceful_stop, executable=evaluator.DAEMON_NAME,
            partition_wait_time=0, sleep_time=60,
            run_once_fnc=functools.partial(
                evaluator.run_once, did_limit=1000, paused_dids=paused_dids
            ),
        )  # fmt: skip

    def judge_repairer() -> None:
        run_daemon(
            once=True, graceful_stop=repairer.graceful_stop, executable=repairer.DAEMON_NAME,
            partition_wait_time=0, sleep_time=60,
            run_once_fnc=functools.partial(
                repairer.run_once, paused_rules=paused_rules, delta=delta
            ),
        )  # fmt: skip

    @read_session
    def waiting_for_chained_source(*, session: Any) -> list[str]:
        """STUCK rules waiting for a chained source that now has one of their files.

        Only those: repairing the others would change nothing but add a rule-history row per
        rule per pass.
        """
        rule, lock, replica = models.ReplicationRule, models.ReplicaLock, models.RSEFileAssociation
        waiting = session.execute(
            select(rule.id, rule.source_replica_expression, rule.account).where(
                and_(
                    rule.state == RuleState.STUCK,
                    rule.source_replica_expression.isnot(None),
                    rule.error.like("MissingSourceReplica%"),
                )
            )
        ).all()
        ready = []
        for rule_id, expression, account in waiting:
            try:
                sources = parse_expression(expression, filter_={"vo": account.vo}, session=session)
            except Exception:  # the expression no longer resolves: nothing to copy from
                continue
            stmt = (
                select(lock.rule_id)
                .join(replica, and_(replica.scope == lock.scope, replica.name == lock.name))
                .where(
                    lock.rule_id == rule_id,
                    lock.state == LockState.STUCK,
                    replica.state == ReplicaState.AVAILABLE,
                    replica.rse_id.in_([r["id"] for r in sources]),
                )
                .limit(1)
            )
            if session.execute(stmt).first() is not None:
                ready.append(str(rule_id))
        return ready

    def chained_source_repairer() -> None:
        for rule_id in waiting_for_chained_source():
            try:
                repair_rule(rule_id=rule_id)
            except Exception:  # a lock held by another daemon: next pass
                _LOG.warning("repairing rule %s failed", rule_id, exc_info=True)

    def conveyor_submitter() -> None:
        submitter.submitter(
            once=True, partition_wait_time=0, bulk=1000, transfertools=[TRANSFERTOOL],
            sleep_time=60,
        )  # fmt: skip

    def conveyor_poller() -> None:
        poller.poller(
            once=True, partition_wait_time=0, older_than=0, db_bulk=1000, fts_bulk=100,
            transfertool=TRANSFERTOOL, sleep_time=60,
        )  # fmt: skip

    def conveyor_finisher() -> None:
        finisher.finisher(once=True, partition_wait_time=0, db_bulk=1000, bulk=100, sleep_time=60)

    @read_session
    def pending(*, session: Any) -> int:
        """Work the next pass would find (chain-waiting rules excluded: they may wait forever)."""
        requests = session.execute(select(func.count()).select_from(models.Request)).scalar_one()
        updated = session.execute(select(func.count()).select_from(models.UpdatedDID)).scalar_one()
        due = datetime.datetime.utcnow() - datetime.timedelta(seconds=delta)
        rule = models.ReplicationRule
        stuck = session.execute(
            select(func.count())
            .select_from(rule)
            .where(
                and_(
                    rule.state == RuleState.STUCK,
                    rule.updated_at < due,
                    or_(rule.error.is_(None), ~rule.error.like("MissingSourceReplica%")),
                )
            )
        ).scalar_one()
        return int(requests) + int(updated) + int(stuck)

    passes: list[tuple[str, Callable[[], None]]] = [
        ("judge-evaluator", judge_evaluator),
        ("judge-repairer", judge_repairer),
        ("chained-source-repairer", chained_source_repairer),
        ("conveyor-submitter", conveyor_submitter),
        ("conveyor-poller", conveyor_poller),
        ("conveyor-finisher", conveyor_finisher),
    ]
    loop = 0
    _write_status(args.status, {"loop": loop, "pid": os.getpid(), "updated": time.time()})
    while not stop.is_set():
        timings: dict[str, float] = {}
        for name, run in passes:
            if stop.is_set():
                break
            t0 = time.monotonic()
            try:
                run()
            except Exception:
                # One daemon's failure (a lock, a race) must not stop the others: next pass.
                _LOG.exception("%s failed", name)
            timings[name] = round(time.monotonic() - t0, 3)
        loop += 1
        try:
            work = pending()
        except Exception:
            _LOG.exception("counting pending work failed")
            work = 1
        _write_status(
            args.status,
            {"loop": loop, "pid": os.getpid(), "updated": time.time(), "pending": work,
             "timings": timings},
        )  # fmt: skip
        if not work:
            stop.wait(args.idle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
