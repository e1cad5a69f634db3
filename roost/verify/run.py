"""``roost verify``: a workload under faults, then the check of the whole history.

K SDK users run in client processes (:mod:`roost.verify.agent`), a few per
process, each with its own durable state file. They reach the gateways only
through fault proxies (:mod:`roost.verify.proxy`). A nemesis drawn from
``--seed`` breaks things while they send 1:1 and group messages and read
some conversations:

* server side (:mod:`roost.verify.targets`): kill -9 of the server or of a
  gateway, Redis restarted empty, PostgreSQL crash-restarted; the embedded
  server's disk failing under SQLite (a failed COMMIT, a full disk, failed
  reads: :mod:`roost.verify.storage_faults`);
* network: connections torn mid-frame, links or a whole gateway blackholed;
* clients: a client process killed with SIGKILL (messages still in its
  outbox) and started again from its state files.

Then every fault is healed, sending stops, the run waits until the system
has converged, and :func:`roost.verify.history.check` judges the history
that the clients recorded, completed by what their state files hold, and
against what the server's store holds (embedded and cluster).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from roost.cli.progress import Progress, on_terminal
from roost.verify.agent import AgentConfig, RecordingClient, RecordLog, UserConfig, read_log
from roost.verify.history import History, ReceiptSeen, Report, Shown, check, percentile
from roost.verify.history import Sent as SentRecord
from roost.verify.proxy import FaultProxy
from roost.verify.storage_faults import KINDS as STORAGE_NEMESES
from roost.verify.targets import (
    CLIENT_NEMESES,
    ClusterTarget,
    EmbeddedTarget,
    Target,
    UrlTarget,
    host_port,
)

NEMESES = (
    "kill-server", *STORAGE_NEMESES, "kill-gateway", "restart-redis", "restart-postgres", *CLIENT_NEMESES,
)  # fmt: skip
# A fault's effects outlast it: a client reconnects with backoff (cap 1 s) and
# reads its inbox; a Redis restart is noticed by the next registry heartbeat
# (5 s), and until then pushes wait in the inbox. Messages sent from a fault's
# start until this long after its end count as "during faults".
FAULT_SHADOW = {"restart-redis": 6.0}
DEFAULT_SHADOW = 2.0


@dataclass
class VerifyConfig:
    mode: str = "embedded"  # embedded | cluster | url
    clients: int = 50
    duration: float = 60.0
    seed: int = 1
    rate: float = 100.0  # messages per second, all clients together
    nemeses: tuple[str, ...] = NEMESES  # those the mode cannot do are ignored
    per_process: int = 5  # users per client process
    converge_timeout: float = 90.0
    urls: list[str] = field(default_factory=list)
    store: str = ""
    server_env: dict[str, str] = field(default_factory=dict)  # embedded server's extra environment


@dataclass
class VerifyResult:
    mode: str
    report: Report
    faults: dict[str, int]
    duration: float
    seed: int
    latency_quiet_ms: list[float] = field(default_factory=list)
    latency_faulty_ms: list[float] = field(default_factory=list)
    redisplayed_after_crash: int = 0
    converged: bool = True
    stuck: dict[str, Any] = field(default_factory=dict)
    storage: dict[str, int] = field(default_factory=dict)  # calls the storage shim failed, restarts
    # Received ciphertexts a client could not decrypt (end-to-end encryption; goal 0).
    decryption_failures: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "seed": self.seed,
            "duration": self.duration,
            "sent": self.report.sent,
            "acked": self.report.acked,
            "delivered": self.report.delivered,
            "converged": self.converged,
            "faults": self.faults,
            "violations": [
                {"kind": v.kind, "invariant": v.invariant, "conv": v.conv, "seq": v.seq, "detail": v.detail}
                for v in self.report.violations
            ],
            "latency_ms": {
                "all": _marks(self.report.latencies_ms),
                "outside_faults": _marks(self.latency_quiet_ms),
                "during_faults": _marks(self.latency_faulty_ms),
            },
            "invariants_broken": _by_invariant(self.report),
            "storage_faults": self.storage,
            "redisplayed_after_crash": self.redisplayed_after_crash,
            "decryption_failures": self.decryption_failures,
            "not_converged": self.stuck,
        }


def _by_invariant(report: Report) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for v in report.violations:
        counts[v.invariant] += 1
    return dict(counts)


def _marks(values: list[float]) -> dict[str, float | None]:
    return {"p50": percentile(values, 50), "p99": percentile(values, 99), "max": percentile(values, 100)}


def nemeses_for(target: Target, wanted: tuple[str, ...]) -> tuple[str, ...]:
    possible = (*target.server_nemeses, *CLIENT_NEMESES)
    return tuple(n for n in wanted if n in possible)


# -- client processes ----------------------------------------------------------


class AgentProcess:
    """A client process with a few users; can be killed and started again."""

    def __init__(self, index: int, root: Path, config: AgentConfig) -> None:
        self.index = index
        self.root = root
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / f"agent{index}.out"

    @property
    def status_path(self) -> Path:
        return Path(self.config.status)

    def start(self) -> None:
        self.config.incarnation += 1
        path = self.root / f"agent{self.index}.json"
        raw = {**self.config.__dict__, "users": [u.__dict__ for u in self.config.users]}
        path.write_text(json.dumps(raw))
        self.status_path.unlink(missing_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "roost.verify.agent", str(path)],
                stdout=out, stderr=out, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def signal(self, signum: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signum)

    def status(self) -> dict[str, dict[str, Any]] | None:
        try:
            status: dict[str, dict[str, Any]] = json.loads(self.status_path.read_text())
            return status
        except (OSError, ValueError):
            return None

    def stop(self, timeout: float = 20.0) -> None:
        self.signal(signal.SIGTERM)
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()


# -- the history ---------------------------------------------------------------


def _read_state(path: Path) -> tuple[list[tuple[str, int, str, str]], dict[str, tuple[int, int]]]:
    """Messages (conv, seq, id, sender) and receipt marks an SDK state file holds."""
    if not path.exists():
        return [], {}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        messages = db.execute("SELECT conv, seq, id, sender FROM messages").fetchall()
        receipts = {c: (d, r) for c, d, r in db.execute("SELECT conv, all_delivered, all_read FROM receipts")}
    finally:
        db.close()
    return messages, receipts


def collect(
    users: dict[str, UserConfig], groups: dict[str, list[str]], with_state: bool
) -> tuple[History, int]:
    """Build the run's history from the users' logs (and, at the end, their state files).

    A message the SDK showed, then lost with its process before committing it,
    is shown again after the restart: that second showing is the first one the
    user keeps, so a repeat across incarnations is not counted as a duplicate
    (a repeat within one incarnation is). Returns the history and how many
    such repeats there were.
    """
    history = History()
    history.members = {g: {m: (0, None) for m in members} for g, members in groups.items()}
    acked: dict[str, tuple[str, int, float]] = {}
    redisplayed = 0
    for name, user in users.items():
        first_incarnation: dict[tuple[str, int], int] = {}
        for r in read_log(Path(user.log)):
            kind = r.get("k")
            if kind == "sent":
                history.sent.append(SentRecord(name, r["id"], r["i"], r["t"]))
            elif kind == "acked":
                acked[r["id"]] = (r["conv"], r["seq"], r["t"])
            elif kind == "shown":
                key = (r["conv"], r["seq"])
                first = first_incarnation.setdefault(key, r["inc"])
                if first != r["inc"]:
                    redisplayed += 1
                    continue
                history.shown.append(Shown(name, r["conv"], r["seq"], r["from"], r["id"], r["t"]))
            elif kind == "protocol":
                history.protocol[(name, r["conv"])].add(r["seq"])
            elif kind == "receipt":
                # A receipt frame names the members whose marks moved; its
                # aggregate (everyone has delivered/read up to ...) speaks for
                # every member, so a coalesced receipt still counts for all.
                every = r.get("all", (0, 0))
                marks = {m: (every[0], every[1]) for m in _others(r["conv"], name, groups)}
                for u, m in r["marks"].items():
                    low = marks.get(u, (0, 0))
                    marks[u] = (max(m[0], low[0]), max(m[1], low[1]))
                history.receipts.append(ReceiptSeen(name, r["conv"], marks, r["t"]))
        if with_state:
            _add_state(history, name, Path(user.state), groups, acked)
    history.sent = [
        SentRecord(s.sender, s.client_id, s.index, s.t, True, *acked[s.client_id])
        if s.client_id in acked else s
        for s in history.sent
    ]  # fmt: skip
    return history, redisplayed


def count_undecryptable(users: dict[str, UserConfig]) -> int:
    """Received messages the users' clients could not decrypt (from their logs)."""
    return sum(
        1 for user in users.values() for r in read_log(Path(user.log)) if r.get("k") == "undecryptable"
    )


def _add_state(
    history: History,
    name: str,
    state: Path,
    groups: dict[str, list[str]],
    acked: dict[str, tuple[str, int, float]],
) -> None:
    """What the SDK committed but its process died before recording: own
    messages that got ✓, and the ticks it last learnt."""
    messages, receipts = _read_state(state)
    for conv, seq, message_id, sender in messages:
        if sender == name and message_id not in acked:
            acked[message_id] = (conv, seq, 0.0)
    for conv, (delivered, read) in receipts.items():
        marks = {m: (delivered, read) for m in _others(conv, name, groups)}
        history.receipts.append(ReceiptSeen(name, conv, marks, time.monotonic()))


def _others(conv: str, name: str, groups: dict[str, list[str]]) -> list[str]:
    """The other members of a group (made before the run) or of a 1:1 conversation."""
    return [m for m in groups.get(conv, conv.split(":")[1:]) if m != name]


def split_latencies(history: History, windows: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """Delivery latencies of messages sent outside / inside (or just after) a fault."""
    sent_at = {(s.sender, s.client_id): s.t for s in history.sent}
    quiet: list[float] = []
    faulty: list[float] = []
    seen: set[tuple[str, str, int]] = set()
    for sh in history.shown:
        t0 = sent_at.get((sh.sender, sh.client_id))
        key = (sh.recipient, sh.conv, sh.seq)
        if t0 is None or key in seen:
            continue
        seen.add(key)
        during = any(start <= t0 <= end for start, end in windows)
        (faulty if during else quiet).append((sh.t - t0) * 1000)
    return quiet, faulty


# -- the run -------------------------------------------------------------------


def make_target(config: VerifyConfig, root: Path) -> Target:
    if config.mode == "embedded":
        return EmbeddedTarget(root, config.server_env)
    if config.mode == "cluster":
        return ClusterTarget(root)
    if config.mode == "url":
        if not config.urls or not config.store:
            raise ValueError("--url needs at least one URL and --store (where to create the test users)")
        return UrlTarget(config.urls, config.store)
    raise ValueError(f"unknown mode {config.mode!r}")


class Run:
    def __init__(self, config: VerifyConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.root = Path(tempfile.mkdtemp(prefix="roost-verify-"))
        self.target = make_target(config, self.root)
        self.nemeses = nemeses_for(self.target, config.nemeses)
        self.faults = dict.fromkeys(self.nemeses, 0)
        self.windows: list[tuple[float, float]] = []
        self.proxies: list[FaultProxy] = []
        self.agents: list[AgentProcess] = []
        self.users: dict[str, UserConfig] = {}
        self.groups: dict[str, list[str]] = {}
        self.background: set[asyncio.Task[int]] = set()  # blackholes: each returns the links it stalled
        self.stuck: dict[str, Any] = {}  # why the last convergence check failed

    async def setup(self) -> None:
        await asyncio.to_thread(self.target.start)
        tag = f"{self.config.seed % 1000}{self.rng.randrange(36**4):04x}"
        names = [f"v{tag}-{i}" for i in range(self.config.clients)]
        tokens = await self.target.add_users(names)
        for url in self.target.urls:
            proxy = FaultProxy(*host_port(url))
            await proxy.start()
            self.proxies.append(proxy)
        self.users = {
            n: UserConfig(n, tokens[n], str(self.root / f"{n}.state"), str(self.root / f"{n}.log"))
            for n in names
        }
        await self._create_groups(names)
        per = max(1, self.config.per_process)
        for index, start in enumerate(range(0, len(names), per)):
            chunk = [self.users[n] for n in names[start : start + per]]
            agent = AgentConfig(
                urls=[p.url for p in self.proxies], users=chunk, peers=names, groups=self.groups,
                rate=self.config.rate * len(chunk) / len(names), seed=self.config.seed, incarnation=0,
                status=str(self.root / f"agent{index}.status"),
            )  # fmt: skip
            self.agents.append(AgentProcess(index, self.root, agent))
        for process in self.agents:
            process.start()

    async def _create_groups(self, names: list[str]) -> None:
        """Two groups, made before the workload through the owner's own SDK state."""
        for g in range(2):
            members = self.rng.sample(names, max(2, len(names) // 4))
            owner = self.users[members[0]]
            # Through a recording client: what the owner's SDK shows now (the
            # group's first message) belongs to the owner's history too.
            log = RecordLog(Path(owner.log))
            client = RecordingClient(self.target.urls, owner.token, state_path=owner.state, log=log,
                                     incarnation=0)  # fmt: skip
            try:
                await client.connect()
                info = await client.create_group(f"group{g}", members[1:])
                await client.flush()
            finally:
                await client.close()
                log.close()
            self.groups[info.group] = list(info.members)

    async def workload(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.duration
        next_fault = loop.time() + self.rng.uniform(2, 5)
        while loop.time() < deadline:
            await asyncio.sleep(min(0.1, max(0.0, deadline - loop.time())))
            for agent in self.agents:  # a client process that died on its own is a bug, not a fault
                if not agent.alive() and agent.proc is not None and agent.proc.returncode != -signal.SIGKILL:
                    raise RuntimeError(f"client process {agent.index} exited with {agent.proc.returncode}")
            if self.nemeses and loop.time() >= next_fault:
                await self.inject(self.rng.choice(self.nemeses))
                next_fault = loop.time() + self.rng.uniform(2, 6)

    async def inject(self, kind: str) -> None:
        self.faults[kind] += 1
        start = time.monotonic()
        if kind == "cut-connection":
            for proxy in self.proxies:
                proxy.cut(self.rng, 0.2)
        elif kind == "blackhole":
            proxy = self.rng.choice(self.proxies)
            seconds = self.rng.uniform(1.0, 6.0)
            whole = self.rng.random() < 0.3
            task = asyncio.create_task(proxy.blackhole(self.rng, 0.3, seconds, whole))
            self.background.add(task)
            task.add_done_callback(self.background.discard)
            self.windows.append((start, start + seconds + DEFAULT_SHADOW))
            return
        elif kind in STORAGE_NEMESES and isinstance(self.target, EmbeddedTarget):
            seconds = self.target.arm_storage(kind, self.rng)
            if kind == "fail-reads":  # the server reads mostly when a client connects
                for proxy in self.proxies:
                    proxy.cut(self.rng, 0.3)
            await asyncio.sleep(seconds)
            await self.target.end_storage_fault()
        elif kind == "crash-client":
            agent = self.rng.choice(self.agents)
            agent.kill()
            await asyncio.sleep(self.rng.uniform(0.1, 1.5))
            agent.start()
        else:
            await self.target.inject(kind, self.rng)
        self.windows.append((start, time.monotonic() + FAULT_SHADOW.get(kind, DEFAULT_SHADOW)))

    async def heal_and_converge(self) -> bool:
        for agent in self.agents:
            agent.signal(signal.SIGUSR1)  # stop sending
        for task in list(self.background):
            with contextlib.suppress(Exception):
                await task
        await self.target.heal()
        for agent in self.agents:
            if not agent.alive():
                agent.start()
                await asyncio.sleep(0.5)
                agent.signal(signal.SIGUSR1)
        return await self._converge()

    async def _converge(self) -> bool:
        """Until every outbox is empty and nothing is missing any more."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.converge_timeout
        while loop.time() < deadline:
            await asyncio.sleep(0.5)
            statuses = [a.status() for a in self.agents]
            users = {name: u for s in statuses if s for name, u in s.items()}
            waiting = {n: u for n, u in users.items() if u["pending"] or not u["connected"]}
            silent = [a.index for a, s in zip(self.agents, statuses, strict=True) if s is None]
            self.stuck = {"no_status": silent}
            if waiting or self.stuck["no_status"]:
                self.stuck["users"] = waiting
                continue
            history, _ = collect(self.users, self.groups, with_state=False)
            missing = [v for v in check(history).violations if v.kind in ("lost", "missing_receipt", "gap")]
            if not missing:
                self.stuck = {}
                return True
            self.stuck["missing"] = [f"{v.kind} {v.conv}#{v.seq}: {v.detail}" for v in missing[:10]]
        return False

    async def finish(self) -> tuple[History, int]:
        await asyncio.gather(*(asyncio.to_thread(a.stop) for a in self.agents))
        history, redisplayed = collect(self.users, self.groups, with_state=True)
        history.stored = await self.target.stored()
        return history, redisplayed

    async def close(self) -> None:
        for agent in self.agents:
            agent.kill()
        for proxy in self.proxies:
            await proxy.stop()
        await asyncio.to_thread(self.target.stop)


async def verify(config: VerifyConfig, keep: bool = False, progress: Progress | None = None) -> VerifyResult:
    run = Run(config)
    started = time.monotonic()
    progress = progress or Progress("roost verify", enabled=False)
    try:
        progress.phase("starting servers and clients")
        await run.setup()
        progress.phase("workload under faults", seconds=config.duration)
        await run.workload()
        progress.phase("healing; waiting until nothing is missing")
        converged = await run.heal_and_converge()
        progress.phase("collecting the history")
        history, redisplayed = await run.finish()
        undecryptable = count_undecryptable(run.users)
    finally:
        progress.close()
        await run.close()
        if not keep:
            shutil.rmtree(run.root, ignore_errors=True)
    report = check(history)
    quiet, faulty = split_latencies(history, run.windows)
    storage = run.target.storage_report() if isinstance(run.target, EmbeddedTarget) else {}
    return VerifyResult(
        config.mode, report, run.faults, time.monotonic() - started, config.seed,
        quiet, faulty, redisplayed, converged, run.stuck, storage, undecryptable,
    )  # fmt: skip


async def verify_embedded(
    clients: int = 50, duration: float = 60.0, seed: int = 1, rate: float = 100.0,
    nemeses: tuple[str, ...] = NEMESES,
) -> VerifyResult:  # fmt: skip
    return await verify(VerifyConfig("embedded", clients, duration, seed, rate, nemeses))


def format_report(result: VerifyResult) -> str:
    r = result.report

    def line(name: str, values: list[float]) -> str:
        marks = _marks(values)
        shown = ", ".join(f"{k} {v:.1f}" if v is not None else f"{k} -" for k, v in marks.items())
        return f"latency ms {name} ({len(values)}): {shown}"

    kinds = _by_invariant(r)
    lines = [
        f"roost verify ({result.mode}) seed={result.seed} duration={result.duration:.1f}s",
        f"sent {r.sent}, acked {r.acked}, delivered (message x recipient) {r.delivered}",
        "faults: " + (", ".join(f"{k} {v}" for k, v in result.faults.items()) or "none"),
        line("all", r.latencies_ms),
        line("outside faults", result.latency_quiet_ms),
        line("during faults", result.latency_faulty_ms),
        f"shown again after a client crash (not kept before it): {result.redisplayed_after_crash}",
        f"decryption failures (end-to-end encryption, goal 0): {result.decryption_failures}",
        *(
            ["storage calls failed: " + ", ".join(f"{k} {v}" for k, v in result.storage.items())]
            if result.storage
            else []
        ),
        f"converged: {'yes' if result.converged else 'NO (timed out): ' + json.dumps(result.stuck)}",
        f"violations: {len(r.violations)}" + (f" by invariant broken: {kinds}" if kinds else ""),
    ]
    lines += [f"  [{v.invariant}] {v.kind} {v.conv}#{v.seq}: {v.detail}" for v in r.violations[:50]]
    return "\n".join(lines)


def run_cli(args: Any) -> int:
    mode = "cluster" if args.cluster else "url" if args.url else "embedded"
    nemeses = tuple(n for n in NEMESES if n not in (args.no or []))
    config = VerifyConfig(
        mode=mode, clients=args.clients, duration=args.duration, seed=args.seed, rate=args.rate,
        nemeses=nemeses, per_process=args.per_process, urls=args.url or [], store=args.store or "",
    )  # fmt: skip
    try:
        result = asyncio.run(
            verify(config, keep=args.keep, progress=Progress("roost verify", on_terminal(args.json)))
        )
    except ValueError as exc:
        print(f"roost verify: {exc}", file=sys.stderr)
        return 2
    print(format_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result.as_json(), indent=2))
    return exit_code(result, nemeses_wanted=bool(nemeses))


def exit_code(result: VerifyResult, nemeses_wanted: bool) -> int:
    r = result.report
    if r.violations:
        return 1
    if result.decryption_failures:
        print(f"{result.decryption_failures} messages could not be decrypted", file=sys.stderr)
        return 1
    if not result.converged:
        print("did not converge: something was still missing when the wait ran out", file=sys.stderr)
        return 1
    if r.acked == 0 or (nemeses_wanted and result.faults and sum(result.faults.values()) == 0):
        print("not a meaningful run: nothing acked or no fault injected", file=sys.stderr)
        return 1
    return 0
