"""
Mutation testing of Hestia's core (issue 21): `./scripts/dev.sh test mutation [MODULE...]`.

The tool is mutmut 3 (the `mutation` extra in setup.cfg).  The core modules are the
`only_mutate` list of setup.cfg's [mutmut] section, the one table of them; the tests it runs are
the fast unit tests named there (`pytest_add_cli_args_test_selection`, `-m unit`).  mutmut
records which tests cover each function and runs only those for a mutant, in a forked process:
a mutant costs a fraction of a second.

    scripts/mutation.py                     every core module, every mutant (long: see DEV_ENVIRONMENT.md)
    scripts/mutation.py queue headers       those modules
    scripts/mutation.py --sample 60 reader  a fixed sample of 60 mutants (same seed, same sample
                                            while the source is unchanged: before/after figures)
    scripts/mutation.py --report lifecycle  only print the last results, run nothing
    scripts/mutation.py --fresh             regenerate everything (after a merge: see --help)

Printed: the survivors of each module (`mutmut show NAME` shows the change), then one line per
module: killed / counted and the score, where "counted" leaves out the mutants reviewed as
equivalent (no behaviour can tell them from the original; the EQUIVALENT table below says why
each is).  Exit status 1 when a module scores below --floor (default 0: report only).
"""

from __future__ import annotations

import argparse
import configparser
import os
import random
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTMUT = [str(Path(sys.executable).with_name("mutmut"))]

# Equivalent mutants: no behaviour can tell them from the original.  mutmut's own marker,
# `# pragma: no mutate`, silences every mutant of a line, and the lines below also carry
# mutants that are real and killed, so the reviewed ones are listed here instead: the function
# (a mutant's name without its number, which changes whenever the function does) -> (text the
# mutated line contains, why that change is equivalent).  A surviving mutant of that function
# whose change does not contain the text is counted like any other.
CASE = "header names are case-insensitive in Headers"
FALSY = "the flag is only tested for truth: None and False are both false"
CODEC = "codec names are case-insensitive"
REASONS = "every ResponseFailed (ResponseNeverReceived too) sets reasons in __init__: the default is never used"
UNREAD_HOST = "ReverseProxyResource's host is never read: render and getChild are Hestia's own"
UNREAD_GATEWAY = "nothing reads a ServicesResource's gateway: getChild asks its ServiceResources"
TIMEOUT_IS_CONNECT = "twisted.internet.error.TimeoutError is a ConnectError: checking ConnectError alone matches it"
CAST = "typing.cast returns its second argument unchanged at run time"
PORT_UNUSED = ("BrowserLikePolicyForHTTPS.creatorForNetloc ignores the port (the TLS name is the host's), and no "
               "other policy is ever passed")
GRANTED_AT = ("read only while a member holds the group, and what makes one the holder "
              "(_grant, add) sets it first")
STOP_NEVER_FAILS = ("stop()'s Deferred never fails (a failed stop is the FAILED state), so this errback "
                    "never runs")
EQUIVALENT: dict[str, list[tuple[str, str]]] = {
    "hestia.lifecycle.xǁServiceLifecycleǁ__init__": [
        ('self._start_reason = "XXXX"', "read only after _begin_start has set it"),
        ('self._pending: Deferred[Any] | None = ""',
         "read only by _abandon_start, which runs only for a start begun, and every start sets it first")],
    "hestia.lifecycle.xǁServiceLifecycleǁrelease_hold": [
        ("if not self.holds or not (self._idle_call",
         "no idle timer runs while a hold is held (hold cancels it, _arm_idle_timer refuses with holds): with "
         "holds left the extra _arm_idle_timer call does nothing, without holds both conditions are true")],
    "hestia.lifecycle.xǁLeaseǁ__init__": [
        ("self._released = None", "the flag is only tested for truth: None and False are both false")],
    "hestia.lifecycle.xǁServiceLifecycleǁ_abandon_start": [
        ("self._generation += 2", "a generation only has to differ from the abandoned one")],
    "hestia.admission.xǁAdmissionǁ_cancelled": [
        ("pop(deferred, )", "a waiter leaves the queue only by firing; a fired Deferred's canceller never runs")],
    "hestia.admission.xǁ_Turnǁ__init__": [
        ("self.deferred = None", "the Deferred is the queue's key; nothing reads the turn's copy")],
    "hestia.queue.xǁWaitQueueǁ_timed_out": [
        ("pop(deferred, )", "a waiter's timer is cancelled whenever it leaves, so it is always there when it fires")],
    "hestia.headers.x_headers_for_backend": [
        ('"REPLACE"', "client_ip is an IP address or 'unix': ASCII, so the error handler is never looked up"),
        ('client_ip.encode("ascii", )', "client_ip is an IP address or 'unix': ASCII, so no error handler is needed")],
    "hestia.headers.x_join_url": [('"ASCII"', "codec names are case-insensitive")],
    "hestia.headers.x__segment_climbs": [
        ('.split("\\x00", )[0]', "the first piece of split(sep) is the first piece of split(sep, 1)")],
    "hestia.headers.x_split_service_path": [('decode("ASCII")', "codec names are case-insensitive")],
    "hestia.config.reader.xǁReaderǁsize": [('or "B")[0].lower()', "the unit is lower-cased right after: 'B' is 'b'")],
    "hestia.config.reader.xǁReaderǁcheck_keys": [
        ("allowed, )", "only the best match (close[0]) is used; n=3 returns it first too")],
    "hestia.guard.x__limits": [
        ('"site", )', "every channel without limits of its own (an HTTP/2 stream) has a site")],
    "hestia.guard.x_raise_open_file_limit": [
        ("soft <= hard", "with soft == hard, setting (hard, hard) changes nothing")],
    "hestia.guard.xǁGuardedChannelǁallHeadersReceived": [
        ("isinstance(site, GuardedSite)) or True", "only GuardedSite.protocol makes GuardedChannels: the site is one"),
        ('b"CONTENT-LENGTH"', CASE), ('b"EXPECT"', CASE)],
    "hestia.guard.xǁGuardedChannelǁ__init__": [
        ("self._rejected = None", "the flag is only tested for truth: None and False are both false")],
    "hestia.guard.xǁGuardedRequestǁparseCookies": [('b"HOST"', CASE), ('b"EXPECT"', CASE)],
    "hestia.lifecycle.xǁServiceLifecycleǁ_start_abandoned": [
        ("failure: log.failure(\"stopping {service}\", service=",
         "stop()'s Deferred never fails (a failed stop is the FAILED state), so this errback never runs")],
    "hestia.guard.xǁGuardedRequestǁprocess": [
        ("APPLICATION/JSON", "media types are case-insensitive (RFC 9110, 8.3.1)")],
    "hestia.proxy._exchange.x__client_headers": [('b"CONNECTION"', CASE)],
    "hestia.proxy._errors.x_write_error": [('"_disconnected", None)', FALSY),
                                           ('b"RETRY-AFTER"', CASE), ('b"CONTENT-TYPE"', CASE),
                                           ('b"CONTENT-LENGTH"', CASE), ('b"X-REQUEST-ID"', CASE), ('b"SERVER"', CASE)],
    "hestia.proxy._exchange.xǁExchangeǁ_respond": [
        ('b"CONTENT-LENGTH"', CASE), ('b"X-REQUEST-ID"', CASE),
        ("deliverBody(None)", "unreachable: a gone client's backend request is cancelled first, and a cancelled "
                              "Deferred drops the response that comes later")],
    "hestia.proxy._exchange.xǁExchangeǁ__init__": [
        ('"ASCII"', "codec names are case-insensitive"),
        ("self._answered_by_gateway = None", "the flag is only tested for truth: None and False are both false"),
        ("self._early = None", FALSY),
        ("self._backend_headers: list[tuple[bytes, list[bytes]]] = None",
         "read only by _send, which a request reaches through _forward's plain branch, which sets it (an upgrade "
         "takes no admission turn, so its failed connect is not retried through _send)"),
        ("self._body_at = 1.0", "read only by the body idle timer, which _start_body_idle_timer arms after setting"),
        ("self._body_at = None", "read only by the body idle timer, which _start_body_idle_timer arms after setting")],
    "hestia.proxy._exchange.x__connect_failure": [('"reasons", None)', REASONS),
                                                ("check(ConnectError, None)", TIMEOUT_IS_CONNECT),
                                                ("check(ConnectError, )", TIMEOUT_IS_CONNECT)],
    "hestia.proxy._exchange.xǁExchangeǁ_fail_over": [("check(ConnectError, None)", TIMEOUT_IS_CONNECT),
                                                    ("check(ConnectError, )", TIMEOUT_IS_CONNECT)],
    "hestia.proxy._exchange.x__refused": [('"reasons", )', REASONS), ('"reasons", None)', REASONS)],
    "hestia.proxy._exchange.xǁExchangeǁ_take_turn": [
        ("self._failed(Failure(None))", "inside the except block a Failure of nothing takes the exception being "
                                        "handled: the same QueueFull"),
        ("if first and admission.try_take()", "wait() admits at once when there is room (queue_limit is at least 1, "
                                              "and nobody waits while there is room): the same turn try_take gives")],
    "hestia.proxy._exchange.xǁExchangeǁ_body_idle": [("cast(None, ", CAST)],
    "hestia.proxy._exchange.xǁExchangeǁ_finished": [("cast(None, ", CAST)],
    "hestia.proxy._exchange.x__describe_upstream_failure": [
        ('"reasons", None)', "only tested for truth: a missing list and an empty one both fall through")],
    "hestia.proxy._exchange.xǁExchangeǁ_open_early": [
        ("now=None", "LoopingCall.start only tests now for truth: None and False both wait a period first"),
        ('b"CONTENT-TYPE"', CASE), ('b"CACHE-CONTROL"', CASE), ('b"X-REQUEST-ID"', CASE), ('b"X-HESTIA-STATE"', CASE),
        ('removeHeader(b"SERVER")', CASE)],
    "hestia.proxy._exchange.xǁExchangeǁ_send": [
        ('self._pending = ""', "reassigned below before anything reads it, or the client is gone and nothing will")],
    "hestia.proxy._resources.xǁServiceProxyResourceǁ__init__": [
        ("        None,", UNREAD_HOST), ('target.hostname and "localhost"', UNREAD_HOST),
        ("target.port and 80", UNREAD_HOST), ('"XXlocalhostXX"', UNREAD_HOST), ("target.port or 81", UNREAD_HOST),
        ('encode("ASCII")', CODEC)],
    "hestia.proxy._resources.xǁServiceProxyResourceǁ_route": [('encode("ASCII")', CODEC)],
    "hestia.proxy._resources.xǁServicesResourceǁ__init__": [("self.gateway = None", UNREAD_GATEWAY)],
    "hestia.proxy._resources.xǁGatewayRootǁ__init__": [
        ("ServicesResource(None,", UNREAD_GATEWAY),
        ("Authenticator(AuthConfig(), None)", "with no tokens authentication is off: check_service and check_admin "
                                              "return before the clock is read (only a failed token reads it)")],
    "hestia.proxy._resources.xǁGatewayRootǁgetChildWithDefault": [
        ('getHeader(b"HOST")', "Request.getHeader looks names up case-insensitively"),
        ("getChildWithDefault(path, None)", "Resource.getChildWithDefault passes the request only to getChild, and "
                                            "GatewayRoot.getChild does not read it")],
    "hestia.proxy._resources.xǁErrorResourceǁrender": [('b"X-REQUEST-ID"', CASE)],
    "hestia.proxy._resources.x__refusing": [
        ("error.reason, None, error.service)",
         "every error _refusing is given is an UnknownService (ServicesResource's, ErrorResource's), which never has "
         "a retry_after")],
    "hestia.proxy._resources.xǁServicesResourceǁgetChild": [('"ASCII"', "codec names are case-insensitive")],
    "hestia.upstream.xǁBackendEndpointFactoryǁendpointForURI": [
        ('decode("ASCII")', "codec names are case-insensitive"),
        ("creatorForNetloc(uri.host, None)", PORT_UNUSED)],
    "hestia.upstream.xǁAttemptEndpointFactoryǁendpointForURI": [("creatorForNetloc(uri.host, None)", PORT_UNUSED),
                                                                ('decode("ASCII")', CODEC)],
    "hestia.upstream.xǁUpstreamǁagent_for_attempt": [
        ("min(attempt, 13)", "CONNECT_RETRY.timeout reaches max_timeout (5 s) by attempt 7 at the latest "
                             "(0.05 s x 2**7): attempts 12 and 13 connect with the same timeout")],
    "hestia.routing.x__write_json": [
        ('b"head"', "Twisted's Request.write sends no body for HEAD whatever the caller does")],
    "hestia.routing.xǁModelRouteǁacquire_passive": [
        ("target.acquire_passive(None)", "every target ignores the request: a lifecycle leases any monitor when "
                                         "ready, an instances or group route hands it to its lifecycles")],
    "hestia.routing.xǁModelRouteǁstop": [
        ("DeferredList(stops, )",
         "a target's stop never fails (a failed stop is the FAILED state): no error to consume")],
    "hestia.routing.xǁModelRouteǁwants_loading_events": [
        ('split(b"?", 2)[0]', "the first piece of split(sep, 2) is the first piece of split(sep, 1)")],
    "hestia.routing.xǁMultiInstanceRouteǁ__init__": [
        ('_CompositeBackend("INSTANCES")',
         "nothing reads a route's backend kind: its status() says 'instances' itself")],
    "hestia.routing.xǁMultiInstanceRouteǁ_acquire": [
        ("failure.check(CancelledError) and outer.called",
         "an attempt fails with CancelledError only through cancel(), inside outer.cancel(), which fails outer with a "
         "CancelledError either way; outer has fired before an attempt fails only in that case")],
    "hestia.groups.xǁCoordinatorǁ__init__": [
        ("self._routes: MutableMapping[str, Any] = None",
         "read only by the start gate, which attach() installs after setting the routes")],
    "hestia.groups.xǁCoordinatorǁshutdown": [
        ("DeferredList(before, )", "a route's shutdown never fails (a lifecycle's stop never does, composites consume "
                                   "their errors), and the last DeferredList consumes every one anyway")],
    "hestia.groups.xǁExclusiveGroupǁ__init__": [("self.granted_at = None", GRANTED_AT),
                                                ("self.granted_at = 1.0", GRANTED_AT)],
    "hestia.groups.xǁExclusiveGroupǁacquire": [
        ("lifecycle.acquire(None)", "ServiceLifecycle.acquire ignores its request (one instance: nothing to choose)"),
        ("failed.errback(None)", "inside the except block errback(None) makes a Failure of the exception being "
                                 "handled: the same GatewayError")],
    "hestia.groups.xǁExclusiveGroupǁconsider": [
        (".addErrback(None)", "stop()'s Deferred never fails (a failed stop is the FAILED state); addErrback(None) "
                              "passes a result through"),
        ("log.failure(None, failure", STOP_NEVER_FAILS),
        ('log.failure("stopping {s}", s=holder.name)', STOP_NEVER_FAILS),
        ('log.failure("stopping {s}", failure, )', STOP_NEVER_FAILS)],
    "hestia.groups.xǁGroupMemberRouteǁacquire_passive": [
        ("acquire_passive(None)", "ServiceLifecycle.acquire_passive ignores its request (a lease for any monitor "
                                  "while ready, None otherwise)")],
    "hestia.groups.xǁGroupMemberRouteǁacquire": [
        ("self.lifecycle, None)", "ServiceLifecycle.acquire ignores its request (one instance: nothing to choose)")],
}

KILLED = {"killed", "timeout", "segfault", "caught by type check"}
SURVIVED = {"survived", "no tests", "suspicious"}


def core_modules() -> dict[str, Path]:
    """The table: setup.cfg [mutmut] only_mutate, as {module name: source path}."""
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    paths = [Path(line.strip()) for line in parser.get("mutmut", "only_mutate").splitlines() if line.strip()]
    # A package's private module is named by its package: src/hestia/proxy/_exchange.py is proxy.exchange.
    return {(f"{p.parent.name}.{p.stem[1:]}" if p.stem.startswith("_") else p.stem): p for p in paths}


def dotted(path: Path) -> str:
    """src/hestia/queue.py -> hestia.queue (mutmut's mutant names start with it)."""
    parts = path.with_suffix("").parts
    return ".".join(parts[1:] if parts[0] == "src" else parts)


def mutmut(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(MUTMUT + list(args), cwd=ROOT, text=True, capture_output=True, check=False)


def results() -> dict[str, str]:
    """{mutant name: status} for every mutant generated so far (`mutmut results --all true`)."""
    out = mutmut("results", "--all", "true").stdout
    found = {}
    for line in out.splitlines():
        match = re.match(r"\s*(\S+): (.+)$", line)
        if match:
            found[match.group(1)] = match.group(2).strip()
    return found


def generate() -> bool:
    """Bring mutants/ up to date with the source (mutmut regenerates changed files only)."""
    # mutmut has no "generate only" command: a run filtered on a name nothing has generates the
    # mutants and the test statistics, then stops on "nothing matches".
    run = mutmut("run", "--max-children", "1", "hestia.no-such-module.*")
    if "failed to collect stats" in run.stdout + run.stderr:
        # A selected test fails in mutants/ (which holds src and tests only: a test reading docs/
        # or scripts/ must be deselected in setup.cfg): without this every mutant reads "not checked".
        print((run.stdout + run.stderr)[-4000:], file=sys.stderr)
        return False
    return True


def equivalent_reason(name: str) -> str | None:
    """Why mutant C{name} is equivalent, if its change is one reviewed as such (see L{EQUIVALENT})."""
    entries = EQUIVALENT.get(name.rsplit("__mutmut_", 1)[0])
    if not entries:
        return None
    diff = mutmut("show", name).stdout
    added = [line for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    return next((reason for text, reason in entries if any(text in line for line in added)), None)


def main() -> int:
    table = core_modules()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modules", nargs="*", help=f"core modules (default: all): {', '.join(table)}")
    ap.add_argument("--sample", type=int, default=0, help="at most N mutants per module (0: all)")
    ap.add_argument("--seed", type=int, default=21, help="seed of the sample")
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("HESTIA_MUTATION_JOBS", "1")),
                    help="parallel mutants (default 1, or HESTIA_MUTATION_JOBS)")
    ap.add_argument("--report", action="store_true", help="print the last results, run nothing")
    ap.add_argument("--fresh", action="store_true",
                    help="start from scratch (mutmut keeps which tests cover which function from its first run: "
                         "after a merge that adds functions, their mutants show as 'no tests' until then)")
    ap.add_argument("--floor", type=float, default=0.0, help="fail when a module scores below this percent")
    args = ap.parse_args()
    # A package's name (proxy) stands for all its modules (proxy.errors, proxy.exchange, ...).
    expanded = [name for m in args.modules for name in ([m] if m in table else
                                                           [t for t in table if t.startswith(m + ".")])]
    unknown = [m for m in args.modules if m not in table and not any(t.startswith(m + ".") for t in table)]
    if unknown:
        ap.error(f"not a core module: {', '.join(unknown)} (the table is setup.cfg [mutmut] only_mutate)")
    modules = expanded or list(table)

    if args.fresh and not args.report:
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)
    if not args.report and not generate():
        return 2
    status = results()
    chosen: dict[str, list[str]] = {}
    for module in modules:
        prefix = dotted(table[module]) + "."
        names = sorted(n for n in status if n.startswith(prefix))
        if args.sample and len(names) > args.sample:
            names = sorted(random.Random(args.seed).sample(names, args.sample))  # noqa: S311 -- a sample, not a secret
        chosen[module] = names
        if not args.report and names:
            print(f"==> {module}: {len(names)} mutants", file=sys.stderr, flush=True)
            run = mutmut("run", "--max-children", str(args.jobs), *names)
            if run.returncode != 0 and "Failed to run clean test" in run.stdout:
                print(run.stdout[-4000:], file=sys.stderr)
                return 2
    status = results()

    rows = []
    failed = False
    for module in modules:
        counts = Counter(status.get(n, "not checked") for n in chosen[module])
        killed = sum(counts[s] for s in KILLED)
        survivors = [n for n in chosen[module] if status.get(n) in SURVIVED]
        reasons = {name: reason for name in survivors if (reason := equivalent_reason(name)) is not None}
        equivalent = list(reasons)
        survivors = [n for n in survivors if n not in reasons]
        checked = killed + len(survivors)
        score = 100.0 * killed / checked if checked else 100.0
        failed |= score < args.floor
        if survivors:
            print(f"\n{module}: {len(survivors)} survivors (`.venv/bin/mutmut show NAME`)")
            for name in survivors:
                print(f"    {name}: {status[name]}")
        if equivalent:
            print(f"\n{module}: {len(equivalent)} equivalent (reviewed, not counted)")
            for name in equivalent:
                print(f"    {name}: {reasons[name]}")
        rows.append((module, killed, checked, score, len(equivalent), counts["not checked"]))

    print(f"\n{'module':<10} {'killed':>7} {'counted':>8} {'score':>7} {'equivalent':>11}")
    for module, killed, checked, score, equivalent, unchecked in rows:
        note = f"  ({unchecked} not checked)" if unchecked else ""
        print(f"{module:<10} {killed:>7} {checked:>8} {score:>6.1f}% {equivalent:>11}{note}")
    print(f"(sample of {args.sample} per module, seed {args.seed})" if args.sample else "(every mutant)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
